"""Context parallel on CUDA: 2 ranks with context_parallel_size=2 (every row's sequence split over both,
ring attention in the SDPA flash/efficient kernels, FSDP over dp x cp) train like one GPU.

Needs 2 CUDA GPUs; skipped without them (CP does not run on CPU: PyTorch shards only the CUDA SDPA kernels).
The rows (12-40 tokens, one per micro-batch) are mostly not divisible by 2 x 2, so the padding is exercised.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness import launch, losses

pytestmark = [pytest.mark.gpu, pytest.mark.distributed, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs >= 2 CUDA GPUs (context parallel over 2 ranks)")]

WORKER = Path(__file__).with_name("tp2d_worker.py")
STEPS = 6


def _runs(small_model, token_data, tmp: Path, mesh: dict) -> list[dict]:
    base = {"model": str(small_model), "data": str(token_data), "steps": STEPS, "total": STEPS, "micro": 1,
            "global": 4, "accelerator": "gpu", "log_dir": str(tmp / "runs"), **mesh}
    return [{**base, "peft": True, "name": "lora", "out": str(tmp / "lora")},
            {**base, "name": "sft", "out": str(tmp / "sft")}]


def test_cp2_trains_like_one_gpu(tmp_path, small_model, token_data):
    for name, mesh, nproc in (("cp", {"dp": 1, "tp": 1, "cp": 2}, 2), ("one", {}, 1)):
        (tmp_path / name).mkdir()
        launch(tmp_path / name, _runs(small_model, token_data, tmp_path / name, mesh), nproc, worker=WORKER)
    for name in ("lora", "sft"):
        got, want = losses(tmp_path / "cp" / "runs" / name), losses(tmp_path / "one" / "runs" / name)
        assert len(got) == len(want) == STEPS
        assert got == pytest.approx(want, rel=2e-4), name
        cp_weights = torch.load(tmp_path / "cp" / name / "final.pt")
        one_weights = torch.load(tmp_path / "one" / name / "final.pt")
        worst = max((cp_weights[k].float() - one_weights[k].float()).abs().max().item() for k in one_weights)
        assert worst < 1e-3, f"{name}: weights differ by {worst}"
