"""Expert parallel (``FSDP2Strategy(expert_parallel_size=2)``) on 2 gloo ranks: a tiny Qwen3-MoE trains equal to
one process (full SFT, and LoRA on attention, with the router loss; DeepSeek-V3 full SFT), composes with TP on
Mixtral, and its checkpoint resumes at E=1 and on one process; its export equals the one-process export's layout
and names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import SGD, assert_sgd_runs_equal, launch, losses

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

EP2 = {"expert_parallel_size": 2}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]  # LoRA that leaves the routed experts to EP


def _save(cfg, tokenizer, out: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory, token_data, tokenizer, tiny_model_factory) -> Path:
    """Plain-SGD runs of a tied Qwen3-MoE (4 experts, top-2) at E=2 on 2 ranks and on one process, and of an
    untied Mixtral at TP=2 x E=2; then AdamW at E=2 with a checkpoint at step 2, resumed at E=1 and alone."""
    import transformers

    tmp = tmp_path_factory.mktemp("ep")
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    qwen = _save(transformers.Qwen3MoeConfig(vocab_size=512, tie_word_embeddings=True, moe_intermediate_size=64,
                                             num_experts=4, num_experts_per_tok=2, head_dim=16, **common),
                 tokenizer, tmp / "qwen3_moe")
    mixtral = _save(transformers.MixtralConfig(vocab_size=512, num_local_experts=4, num_experts_per_tok=2, **common),
                    tokenizer, tmp / "mixtral")
    base = {"data": str(token_data), "micro": 2, "global": 4, "log_dir": str(tmp / "runs")}
    sgd = {**base, **SGD}
    kinds = {"sft": {}, "lora": {"peft": True, "targets": ATTENTION}}
    deepseek = {**sgd, "model": str(tiny_model_factory("deepseek_v3"))}  # MLA attention, a dense first layer
    resume = {**base, "model": str(qwen), "steps": 4, "total": 4, "lr": 1e-2}
    launch(tmp, [*({**sgd, **kind, "model": str(qwen), "strategy": EP2, "name": f"ep2-{k}", "out": str(tmp / "ep2" / k)}
                   for k, kind in kinds.items()),
                 {**sgd, "model": str(mixtral), "strategy": {**EP2, "tensor_parallel_size": 2}, "name": "tp2ep2",
                  "out": str(tmp / "tp2ep2")},
                 {**deepseek, "strategy": EP2, "name": "ep2-deepseek", "out": str(tmp / "ep2" / "deepseek")},
                 {**resume, "strategy": EP2, "name": "adamw-ep2", "every": 2, "out": str(tmp / "adamw-ep2")}])
    step2 = tmp / "runs" / "adamw-ep2" / "checkpoints" / "step-000002"
    launch(tmp, [{**resume, "strategy": "fsdp2", "name": "resumed-ep1", "resume_from": str(step2),
                  "out": str(tmp / "resumed-ep1")}])
    launch(tmp, [*({**sgd, **kind, "model": str(qwen), "name": f"single-{k}", "out": str(tmp / "single" / k)}
                   for k, kind in kinds.items()),
                 {**sgd, "model": str(mixtral), "name": "single-mixtral", "out": str(tmp / "single-mixtral")},
                 {**deepseek, "name": "single-deepseek", "out": str(tmp / "single" / "deepseek")},
                 {**resume, "name": "resumed-single", "resume_from": str(step2), "out": str(tmp / "resumed-single")}],
           nproc=1)
    return tmp


@pytest.mark.parametrize("kind", ["sft", "lora", "deepseek"])  # Qwen3-MoE full SFT, attention LoRA; DeepSeek-V3 SFT
def test_two_expert_parallel_ranks_equal_one_process(ep_runs, kind):
    ep, single = losses(ep_runs / "runs" / f"ep2-{kind}"), losses(ep_runs / "runs" / f"single-{kind}")
    assert len(ep) == len(single) == SGD["steps"]
    for got, ref in zip(ep, single, strict=True):
        assert abs(got - ref) <= 1e-5 * abs(ref), (ep, single)
    assert_sgd_runs_equal(ep_runs / "ep2" / kind, ep_runs / "single" / kind, f"ep=2 {kind}")


def test_expert_parallel_composes_with_tensor_parallel(ep_runs):
    assert_sgd_runs_equal(ep_runs / "tp2ep2", ep_runs / "single-mixtral", "tp=2 x ep=2 mixtral sft")


@pytest.mark.parametrize("layout", ["ep1", "single"])
def test_expert_parallel_checkpoint_resumes_at_another_layout(ep_runs, layout):
    """The E=2 checkpoint at step 2, resumed at E=1 on 2 ranks or on one process, ends where E=2 ended."""
    ref = torch.load(ep_runs / "adamw-ep2" / "final.pt", weights_only=True)
    got = torch.load(ep_runs / f"resumed-{layout}" / "final.pt", weights_only=True)
    assert got.keys() == ref.keys() and any(".experts." in k for k in got)
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-5
    assert len(losses(ep_runs / "runs" / f"resumed-{layout}")) == 2  # it trained steps 3-4 only
    meta = json.loads((ep_runs / "runs" / f"resumed-{layout}" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 4


def test_expert_parallel_export_equals_one_process_export(ep_runs):
    """The HF export written at E=2 holds every expert, under transformers' names, equal to one process's."""
    from safetensors.torch import load_file

    def export(name: str) -> dict:
        return load_file(ep_runs / "runs" / name / "checkpoints" / "last" / "model" / "model.safetensors")

    got, ref = export("ep2-sft"), export("single-sft")
    assert got.keys() == ref.keys()
    assert got["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 4  # all 4 experts, not this rank's 2
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-5
