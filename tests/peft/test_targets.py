"""LoRA target resolution on real HF architectures (wildcards, regexes, Megatron aliases)."""

import pytest
import transformers

from nemo_automodel.errors import ConfigError
from nemo_automodel.peft.targets import resolve_target_modules


def _model(arch):
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128)
    cfg = {"llama": lambda: transformers.LlamaConfig(**tiny),
           "qwen2": lambda: transformers.Qwen2Config(**tiny),
           "phi3": lambda: transformers.Phi3Config(**tiny, pad_token_id=0),
           "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128)}[arch]()
    return transformers.AutoModelForCausalLM.from_config(cfg)


def leaves(names):
    return sorted({n.split(".")[-1] for n in names})


def test_wildcard_selects_all_projections_of_llama():
    names = resolve_target_modules(_model("llama"), ["*_proj"])
    assert leaves(names) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert len(names) == 14  # 7 per layer, 2 layers


def test_megatron_aliases_resolve_per_architecture():
    llama = _model("llama")
    assert leaves(resolve_target_modules(llama, ["linear_qkv"])) == ["k_proj", "q_proj", "v_proj"]
    assert leaves(resolve_target_modules(llama, ["linear_proj"])) == ["o_proj"]
    assert leaves(resolve_target_modules(llama, ["linear_fc1"])) == ["gate_proj", "up_proj"]
    assert leaves(resolve_target_modules(llama, ["linear_fc2"])) == ["down_proj"]
    phi3 = _model("phi3")  # fused qkv_proj and gate_up_proj
    assert leaves(resolve_target_modules(phi3, ["linear_qkv", "linear_fc1"])) == ["gate_up_proj", "qkv_proj"]
    gpt2 = _model("gpt2")  # Conv1D; c_proj exists in both attention and MLP
    assert resolve_target_modules(gpt2, ["linear_qkv"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert resolve_target_modules(gpt2, ["linear_proj"]) == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    assert resolve_target_modules(gpt2, ["linear_fc2"]) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


def test_nemo_default_list_works_on_llama_and_gpt2():
    # ['*_proj', 'linear_qkv'] is the NeMo example; on GPT-2 '*_proj' finds c_proj, the alias c_attn.
    assert len(resolve_target_modules(_model("llama"), ["*_proj", "linear_qkv"])) == 14
    assert leaves(resolve_target_modules(_model("gpt2"), ["*_proj", "linear_qkv"])) == ["c_attn", "c_proj"]


def test_regex_plain_names_and_exclude():
    qwen = _model("qwen2")
    assert resolve_target_modules(qwen, [r"model\.layers\.0\.self_attn\.(q|v)_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert len(resolve_target_modules(qwen, ["q_proj"])) == 2
    names = resolve_target_modules(qwen, ["*_proj"], exclude_modules=["*mlp*", "model.layers.1.*"])
    assert leaves(names) == ["k_proj", "o_proj", "q_proj", "v_proj"] and all(".layers.0." in n for n in names)


def test_matching_nothing_lists_candidates():
    with pytest.raises(ConfigError) as err:
        resolve_target_modules(_model("llama"), ["attention.dense", "*_nope"])
    msg = str(err.value)
    assert "match no layer of LlamaForCausalLM" in msg
    assert "model.layers.*.self_attn.q_proj" in msg and "\n" not in msg
