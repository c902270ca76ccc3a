"""The mixture-of-experts and state-space/hybrid families (tiny Qwen3-MoE, Mixtral, DeepSeek-V3, Mamba2, Nemotron-H
from ``TINY_FAMILIES``, 512-token vocabulary) in real processes: on 2 FSDP2 ranks they equal one process (plain-SGD
steps compared by weights, full SFT and LoRA with the experts adapted and the router load-balancing loss), and a
run SIGKILLed mid-checkpoint resumes to the uninterrupted run's weights bitwise.

One torchrun start serves every family's FSDP2 runs, one process the single-process ones and the uninterrupted
references, one process all the resumes: a family costs its runs, not interpreter starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness import SGD, assert_sgd_runs_equal, launch, losses, max_diff, meta, start

from tests.conftest import TINY_FAMILIES

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "mamba2", "nemotron_h"]
# FSDP2 vs one process: full SFT everywhere, LoRA where it adapts fused expert weights (3-D, sharded on dim 0);
# a Mamba mixer's in_proj is a plain Linear, as in the dense FSDP2 LoRA tests
EXPERT_LORA = ("qwen3_moe", "mixtral", "deepseek_v3")
SGD_KINDS = [(arch, "sft") for arch in FAMILIES] + [(arch, "lora") for arch in EXPERT_LORA]
# SIGKILL resume, one kind per family (one killed process each): LoRA where the adapters are new (fused experts,
# which take no LoRA dropout; Nemotron-H's mixer, attention and MLP with dropout 0.1: the RNG is restored), full
# SFT (AdamW state of every weight) for Qwen3-MoE's router and experts and Mamba2's state-space parameters
CRASH_KIND = {"qwen3_moe": "sft", "mixtral": "lora", "deepseek_v3": "lora", "mamba2": "sft", "nemotron_h": "lora"}
CRASH_STEPS, EVERY = 4, 2  # killed while writing the last checkpoint (4): the resume starts after step 2


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Each family with a 512-token vocabulary (Qwen3-MoE with tied embeddings), saved with the real tokenizer."""
    import transformers

    tmp = tmp_path_factory.mktemp("families")
    paths = {}
    for arch in FAMILIES:
        cfg = TINY_FAMILIES[arch](512)
        cfg.bos_token_id, cfg.eos_token_id = 1, 2
        cfg.tie_word_embeddings = arch == "qwen3_moe"
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / arch)
        tokenizer.save_pretrained(tmp / arch)
        paths[arch] = tmp / arch
    return paths


def _sgd_runs(models: dict[str, Path], data: Path, tmp: Path, where: str) -> list[dict]:
    return [{"model": str(models[arch]), "data": str(data), "micro": 2, "global": 4, **SGD, "log_dir": str(tmp / "runs"),
             "strategy": "fsdp2" if where == "fsdp2" else None, "peft": kind == "lora", "name": f"{where}-{arch}-{kind}",
             "out": str(tmp / where / arch / kind)} for arch, kind in SGD_KINDS]


def _crash_run(models: dict[str, Path], data: Path, arch: str, log_dir: Path, name: str) -> dict:
    """AdamW (warmup + cosine), LoRA dropout 0.1 (0 with fused experts): the resume test's set-up and reference."""
    return {"model": str(models[arch]), "data": str(data), "micro": 2, "global": 4, "steps": CRASH_STEPS,
            "total": CRASH_STEPS, "peft": CRASH_KIND[arch] == "lora", "dropout": 0.0 if arch in EXPERT_LORA else 0.1,
            "log_dir": str(log_dir), "name": name}


@pytest.fixture(scope="module")
def single(tmp_path_factory, family_models, token_data) -> Path:
    """One process: every family's SGD runs, then the uninterrupted references of the resume test (``ref-{arch}``)."""
    tmp = tmp_path_factory.mktemp("single")
    refs = [{**_crash_run(family_models, token_data, arch, tmp / "runs", f"ref-{arch}"), "out": str(tmp / "ref" / arch)}
            for arch in FAMILIES]
    launch(tmp, _sgd_runs(family_models, token_data, tmp, "single") + refs, nproc=1)
    return tmp


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory, family_models, token_data) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp2")
    launch(tmp, _sgd_runs(family_models, token_data, tmp, "fsdp2"), nproc=2)
    return tmp


@pytest.mark.parametrize(("arch", "kind"), SGD_KINDS)
def test_family_on_two_fsdp2_ranks_equals_one_process(arch, kind, fsdp2, single):
    if kind == "lora":  # the experts' fused weights carry adapters, and they moved
        final = torch.load(single / "single" / arch / kind / "final.pt", weights_only=True)
        assert any(".experts." in k and "lora_B" in k and v.abs().sum() > 0 for k, v in final.items()), sorted(final)
    assert_sgd_runs_equal(fsdp2 / "fsdp2" / arch / kind, single / "single" / arch / kind, f"fsdp2 {arch} {kind}")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, family_models, token_data) -> Path:
    """Every family's run (a checkpoint every ``EVERY`` steps) SIGKILLed while writing its last checkpoint, once
    that step's state is written (its processes side by side, each killing itself as the torn saves of
    tests/distributed/test_crash_resume.py do), then all resumed in one process."""
    tmp = tmp_path_factory.mktemp("crash")
    runs = {arch: {**_crash_run(family_models, token_data, arch, tmp / "runs", arch), "every": EVERY}
            for arch in FAMILIES}
    procs = {arch: start(tmp, [{**run, "kill_in_save_at": CRASH_STEPS, "kill_point": "export"}], nproc=1)
             for arch, run in runs.items()}
    for arch, proc in procs.items():
        assert proc.wait(timeout=600) == -9, f"{arch}: exit {proc.returncode}, not SIGKILL"
        # it trained every step, and its last complete checkpoint is an earlier one
        assert len(losses(tmp / "runs" / arch)) == CRASH_STEPS and meta(tmp / "runs" / arch)["step"] == CRASH_STEPS - EVERY
    launch(tmp, [{**run, "resume": True, "out": str(tmp / "out" / arch)} for arch, run in runs.items()], nproc=1)
    return tmp


@pytest.mark.parametrize("arch", FAMILIES)
def test_sigkill_mid_checkpoint_then_resume_equals_uninterrupted(arch, resumed, single):
    run_dir = resumed / "runs" / arch
    assert meta(run_dir)["resumed_from"] == CRASH_STEPS - EVERY  # the torn checkpoint was never used
    final = torch.load(resumed / "out" / arch / "final.pt", weights_only=True)
    reference = torch.load(single / "ref" / arch / "final.pt", weights_only=True)
    if CRASH_KIND[arch] == "lora":
        assert any("lora_B" in k for k in final), sorted(final)
    assert max_diff(final, reference) == 0.0
    assert losses(run_dir) == losses(single / "runs" / f"ref-{arch}")  # each step logged once, the same
