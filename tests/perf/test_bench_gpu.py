"""`make bench-gpu` cannot rot: its FLOP count is exact for Llama-3-8B and `--smoke` runs the same code on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_gpu  # noqa: E402


def test_flops_count_the_real_llama3_8b_matmul_weights():
    # 8,030,261,248 parameters - 525,336,576 input embedding - 266,240 norm weights (FACTS.md)
    assert bench_gpu.flops_per_token(bench_gpu.MODELS["llama-3-8b"], "full", 0) == 6 * 7_504_658_432
    assert bench_gpu.flops_per_token(bench_gpu.MODELS["llama-3-8b"], "lora", 4096) == \
        4 * 7_504_658_432 + 6 * 32 * 4096 * 4096
    assert bench_gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and bench_gpu.peak_flops("NVIDIA H100 PCIe") == 756e12


@pytest.mark.slow
def test_smoke_runs_every_peer_on_cpu(capsys):
    assert bench_gpu.main(["--smoke", "--out", ""]) == 0
    out = capsys.readouterr().out
    assert out.count("| tiny | lora | ours |") == 2 and "| tiny | full | ours | off |" in out
