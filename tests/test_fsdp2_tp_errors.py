"""FSDP2Strategy's tensor/context-parallel input errors (one line each) and the TP plan, without processes."""

from __future__ import annotations

import pytest
import torch

from nemo_automodel.errors import ConfigError
from nemo_automodel.models.hf_parallel import hf_tensor_parallel_plan
from nemo_automodel.parallel.strategy import FSDP2Strategy
from nemo_automodel.parallel.tensor_parallel import concrete_plan, resolve_plan


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def _model(kind: str):
    import transformers

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    if kind == "phi3":
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**small, pad_token_id=0))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))


def test_dp_times_tp_must_be_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError) as err:
        FSDP2Strategy(tensor_parallel_size=2, data_parallel_size=3).setup("cpu")
    assert "data_parallel_size=3 x tensor_parallel_size=2 = 6 must equal the number of processes (1)" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        FSDP2Strategy(tensor_parallel_size=2).setup("cpu")
    assert "tensor_parallel_size=2 is invalid: must divide the number of processes (1)" in _one_line(err)


def test_context_parallel_on_cpu_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError) as err:
        FSDP2Strategy(context_parallel_size=2).setup("cpu")
    assert "context_parallel_size=2" in _one_line(err) and "CUDA" in str(err.value)


def test_bad_sizes_and_plan_argument():
    with pytest.raises(ConfigError):
        FSDP2Strategy(tensor_parallel_size=0)
    with pytest.raises(ConfigError):
        FSDP2Strategy(tp_plan=["q_proj"])


def test_model_without_tp_plan_named():
    with pytest.raises(ConfigError) as err:
        resolve_plan(hf_tensor_parallel_plan(_model("gpt2")))
    assert "GPT2LMHeadModel has no tensor-parallel plan" in _one_line(err)
    assert resolve_plan(hf_tensor_parallel_plan(_model("gpt2")), {"h.*.mlp.c_fc": "colwise"}) == {"h.*.mlp.c_fc": "colwise"}


def test_unsupported_style_named_unless_overridden():
    with pytest.raises(ConfigError) as err:
        resolve_plan(hf_tensor_parallel_plan(_model("phi3")))
    assert "'colwise_gather_output'" in _one_line(err) and "Phi3ForCausalLM" in str(err.value)
    plan = resolve_plan(hf_tensor_parallel_plan(_model("phi3")), {"layers.*.mlp.gate_up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise"})
    assert set(plan.values()) == {"colwise", "rowwise"}


def test_llama_plan_and_lora_parts():
    from peft import LoraConfig, get_peft_model

    model = _model("llama")
    plan = resolve_plan(hf_tensor_parallel_plan(model))
    assert plan["layers.*.self_attn.q_proj"] == "colwise" and plan["layers.*.mlp.down_proj"] == "rowwise"
    assert concrete_plan(model.model, plan, 2)["layers.0.self_attn.o_proj"] == "rowwise"
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    concrete = concrete_plan(peft.get_base_model().model, plan, 2)
    assert concrete["layers.0.self_attn.q_proj.base_layer"] == "colwise"
    assert concrete["layers.0.self_attn.q_proj.lora_B.default"] == "colwise"
    assert concrete["layers.0.mlp.down_proj.lora_A.default"] == "rowwise"
    assert "layers.0.self_attn.q_proj.lora_A.default" not in concrete
    assert concrete["layers.0.self_attn.k_proj"] == "colwise"  # no adapter: the Linear itself
    with pytest.raises(ConfigError) as err:
        concrete_plan(model.model, plan, 3)
    assert "tensor_parallel_size=3 does not divide" in _one_line(err)


@pytest.mark.gpu
def test_context_parallel_on_cuda_checks_the_mesh(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError) as err:
        FSDP2Strategy(context_parallel_size=2).setup("cuda")
    assert "context_parallel_size x tensor_parallel_size = 2 must divide the number of processes (1)" in _one_line(err)
