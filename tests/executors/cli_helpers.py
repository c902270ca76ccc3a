"""Helpers for executor tests: run recipe files as a user would, with tiny-model overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HF_RECIPE = ROOT / "recipes" / "hf_auto_model_for_causal_lm.py"


def tiny_args(model: Path, data: Path, out: Path, name: str, steps: int = 3) -> list[str]:
    """Overrides that turn the generic HF recipe into a seconds-long LoRA run on a tiny model."""
    return [f"model.model_id={model}", f"data.path_or_dataset={data}", "data.formatting=chat",
            f"trainer.max_steps={steps}", "data.seq_length=64", "data.micro_batch_size=2",
            "data.global_batch_size=4", f"log.log_dir={out}", f"log.name={name}"]


def run_cli(*args: str, script: Path = HF_RECIPE, timeout: int = 600, cwd: Path | None = None,
            exe: list[str] | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a recipe file (or ``exe``, e.g. the ``nemo`` command) with ``args``; never raises on exit codes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200", **(env or {})}
    cmd = (exe or [sys.executable, str(script)]) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=env)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def adapter(run_dir: Path) -> dict:
    """The trained LoRA tensors of a run's last checkpoint."""
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / "last" / "hf_adapter" / "adapter_model.safetensors")


def assert_bitwise_equal(got: dict, want: dict) -> None:
    import torch

    assert got.keys() == want.keys()
    unequal = [k for k in want if not torch.equal(got[k], want[k])]
    assert not unequal, f"{len(unequal)} of {len(want)} tensors differ, e.g. {unequal[:3]}"
