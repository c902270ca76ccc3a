"""Expert parallel on paper (no processes): the experts' view of the mesh, the plan the model gives, and the
one-line refusals (a dense model, an expert count E does not divide, LoRA on the experts, sizes that do not fit)."""

from __future__ import annotations

import pytest

from nemo_automodel.errors import ConfigError
from nemo_automodel.models.hf_parallel import hf_expert_parallel_plan, hf_tensor_parallel_plan
from nemo_automodel.parallel.expert_parallel import concrete_expert_plan, tensor_parallel_styles_outside
from nemo_automodel.parallel.mesh import describe_mesh, expert_dims


def test_the_experts_view_of_the_ranks():
    assert expert_dims(16, 8, 2) == {"efsdp": 2, "ep": 8}
    assert expert_dims(8, 1, 4) == {"efsdp": 8, "ep": 1}  # no EP: nothing to check against TP
    assert describe_mesh({"dp": 8, "cp": 1, "tp": 2}, 8, expert_parallel_size=4) == (
        "mesh (dp=8, tp=2) over 16 ranks on 2 nodes x 8: tp groups within a node, dp groups across nodes; "
        "experts (efsdp=4, ep=4): ep groups within a node")
    with pytest.raises(ConfigError, match=r"expert_parallel_size=3 is invalid: must divide the number of processes \(8\)"):
        expert_dims(8, 3)
    with pytest.raises(ConfigError, match="must be a multiple of tensor_parallel_size"):
        expert_dims(8, 2, 4)


@pytest.fixture(scope="module")
def qwen3_moe():
    import torch
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def test_the_plan_names_every_experts_module_and_weight_and_leaves_their_tp_rules_to_ep(qwen3_moe):
    plan = hf_expert_parallel_plan(qwen3_moe)
    assert plan.num_experts == 4 and plan.model == "Qwen3MoeForCausalLM"
    concrete = concrete_expert_plan(plan, 2)
    assert concrete == {f"layers.{i}.mlp.experts{w}": s for i in (0, 1)
                        for w, s in ((".gate_up_proj", "grouped_gemm"), (".down_proj", "grouped_gemm"),
                                     ("", "ep_dispatch_experts"))}
    assert list(concrete.values())[-1] == "ep_dispatch_experts"  # the weights are sharded before the dispatch reads them
    tp = tensor_parallel_styles_outside(hf_tensor_parallel_plan(qwen3_moe).styles or {}, plan)
    assert not any(".experts" in p for p in tp) and "layers.*.self_attn.q_proj" in tp


def test_refusals_name_the_cause(qwen3_moe):
    import transformers
    from peft import LoraConfig, get_peft_model

    plan = hf_expert_parallel_plan(qwen3_moe)
    with pytest.raises(ConfigError, match=r"expert_parallel_size=3 does not divide the 4 routed experts of Qwen3MoeForCausalLM"):
        concrete_expert_plan(plan, 3)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM has no routed experts to split .*use expert_parallel_size=1"):
        concrete_expert_plan(hf_expert_parallel_plan(dense), 2)
    adapted = get_peft_model(qwen3_moe, LoraConfig(r=2, target_modules=["q_proj"],
                                                   target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with pytest.raises(ConfigError, match=r"cannot split Qwen3MoeForCausalLM's routed experts while LoRA adapts them "
                                          r"\(layers.0.mlp.experts: down_proj, gate_up_proj\)") as err:
        concrete_expert_plan(hf_expert_parallel_plan(adapted), 2)
    assert "\n" not in str(err.value)
    adapted.unload()
