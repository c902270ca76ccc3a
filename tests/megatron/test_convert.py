"""HF <-> Megatron-Core conversion: logits match the HF model, the round trip is bitwise, bad input is named."""

from __future__ import annotations

import pytest
import torch
import transformers

from nemo_automodel.errors import ConfigError
from nemo_automodel.megatron import MegatronGPTModel, gpt_config_from_hf
from nemo_automodel.megatron.convert import megatron_to_hf

ATOL = 1e-5  # fp32; observed 0 to 3e-7 on this CPU
IDS = torch.arange(2 * 16).reshape(2, 16) * 37 % 509 + 3


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_logits_equal_hf_and_round_trip_is_bitwise(arch, megatron_model_factory, megatron_strategy):
    path = megatron_model_factory(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = MegatronGPTModel(str(path))
    module = model.configure_model().eval()
    with torch.no_grad():
        ours = model.logits(module, {"input_ids": IDS})
        ref = hf(input_ids=IDS, use_cache=False).logits
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < ATOL

    megatron_state = {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    back = megatron_to_hf(megatron_state, model.config)
    hf_state = {k: v for k, v in hf.state_dict().items()
                if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)}
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[k], hf_state[k]) for k in back)


def test_packed_rows_attend_within_their_sample(megatron_model_factory, megatron_strategy):
    """Position ids restarting at 0 start a new sample: logits equal running each sample alone."""
    model = MegatronGPTModel(str(megatron_model_factory("qwen2")))
    module = model.configure_model().eval()
    ids = IDS[:1]
    pos = torch.cat([torch.arange(9), torch.arange(7)])[None]
    with torch.no_grad():
        packed = model.logits(module, {"input_ids": ids, "position_ids": pos})
        alone = torch.cat([model.logits(module, {"input_ids": ids[:, :9]}),
                           model.logits(module, {"input_ids": ids[:, 9:]})], dim=1)
    assert (packed - alone).abs().max().item() < ATOL


@pytest.mark.parametrize(("config", "named"), [
    (transformers.GPT2Config(n_layer=1), "GPT2LMHeadModel has no Megatron-Core mapping"),
    (transformers.LlamaConfig(hidden_act="gelu"), "hidden_act='gelu'"),
    (transformers.LlamaConfig(attention_bias=True), "attention_bias=True"),
    (transformers.LlamaConfig(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "rope_type='yarn'"),
])
def test_unsupported_architectures_name_what_is_missing(config, named):
    config.architectures = config.architectures or [type(config).__name__.replace("Config", "ForCausalLM")]
    if isinstance(config, transformers.GPT2Config):
        config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        gpt_config_from_hf(config)


def test_tensor_parallel_size_must_divide_the_model():
    cfg = gpt_config_from_hf(transformers.Qwen2Config(num_attention_heads=14, num_key_value_heads=2, hidden_size=896))
    with pytest.raises(ConfigError, match=r"tensor_model_parallel_size=4 does not divide .*num_attention_heads"):
        cfg.check_tensor_parallel(4)


def test_weights_stream_from_sharded_safetensors_like_transformers_loads_them(megatron_model_factory, megatron_strategy,
                                                                              tmp_path):
    """A sharded bf16 checkpoint read tensor by tensor gives the same fp32 model as a .bin-only copy,
    which goes through transformers; a tensor missing from the checkpoint is named."""
    from safetensors.torch import load_file, save_file

    hf = transformers.AutoModelForCausalLM.from_pretrained(megatron_model_factory("qwen2"), dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")

    streamed = dict(MegatronGPTModel(str(tmp_path / "sharded")).configure_model().named_parameters())
    loaded = dict(MegatronGPTModel(str(tmp_path / "bin")).configure_model().named_parameters())
    assert streamed.keys() == loaded.keys()
    assert all(streamed[k].dtype == torch.float32 and torch.equal(streamed[k], loaded[k]) for k in streamed)

    hf.save_pretrained(tmp_path / "broken")
    tensors = load_file(tmp_path / "broken" / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "broken" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="checkpoint has no tensor 'model.layers.1.mlp.up_proj.weight'"):
        MegatronGPTModel(str(tmp_path / "broken")).configure_model()
