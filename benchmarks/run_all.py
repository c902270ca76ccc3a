"""``make bench``: every benchmark, one after another; ratio lines collected into RESULTS.md.

1. ``trainer_vs_torch_loop.py`` — ours ÷ hand loop and MFU (hidden 512, fp32), eager and with
   ``--jit`` (compile on ÷ off = the ratio of the two paired ratios).
2. ``loss_memory.py`` — peak memory chunked ÷ plain loss (vocab 32768 and 49152, 2 x 1024 tokens).
3. ``peers.py`` — ours ÷ TRL SFTTrainer (both packed) in fp32 and in bf16, ours unpacked ÷ HF
   Trainer (same batches), packing on/off, bf16 on/off on SmolLM2-135M + the demo chat data.
   The same harness on a random Qwen3-MoE (full SFT, fp32, same batches, 1 thread): ours ÷ HF Trainer.
4. ``profile_step.py`` — the share of a step spent in the model's own math (matmul, attention):
   the ceiling on what any framework can gain in the same precision.
5. ``megatron_load.py`` — peak memory of building a Megatron model from a bf16 HF checkpoint:
   tensor-by-tensor safetensors reading ÷ loading the HF model with transformers first.

Each child prints its own table; the lines with ``ratio`` go into ``benchmarks/RESULTS.md`` with
the load average, so a quiet and a busy machine can be told apart.

    .venv/bin/python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(title: str, args: list[str], rows: list[tuple[str, str, str]]) -> None:
    print(f"\n== {title}", flush=True)
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, *args], cwd=HERE.parent, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    print(proc.stdout, end="", flush=True)
    found = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip().startswith("ratio")]
    for line in found or [f"(failed, exit {proc.returncode})"]:
        rows.append((title, line, f"{load:.1f} → {os.getloadavg()[0]:.1f}"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rows: list[tuple[str, str, str]] = []
    steps = ["--steps", "4", "--warmup", "1"] if a.quick else ["--steps", "12", "--warmup", "2"]
    run("ours ÷ hand loop, MFU (hidden 512, fp32, eager)", ["benchmarks/trainer_vs_torch_loop.py", *steps], rows)
    run("ours+torch.compile ÷ hand loop (eager)", ["benchmarks/trainer_vs_torch_loop.py", "--jit", *steps], rows)
    run("loss memory, vocab 32768", ["benchmarks/loss_memory.py", "--vocab", "32768"], rows)
    run("loss memory, vocab 49152", ["benchmarks/loss_memory.py", "--vocab", "49152"], rows)
    # 8 timed steps, min/median/max of the per-step ratios printed: a few steps swung ours ÷ TRL 0.98..1.55 here
    peer_steps = ["--steps", "1", "--warmup", "1"] if a.quick else ["--steps", "8", "--warmup", "2"]
    run("peers: SmolLM2-135M LoRA, demo chat data", ["benchmarks/peers.py", *peer_steps], rows)
    # a step takes ~0.3 s: more timed steps; one torch thread each (steps this short on 2 OpenMP threads swung
    # 0.15..4.2 per step on a loaded machine, 0.71..1.75 on one thread)
    moe_steps = ["--steps", "2", "--warmup", "1"] if a.quick else ["--steps", "20", "--warmup", "3"]
    run("peers: random Qwen3-MoE, full SFT, fp32, same batches, 1 thread",
        ["benchmarks/peers.py", "--groups", "ours-moe,hf-moe", "--threads", "1", *moe_steps], rows)
    run("where a step's time goes (torch.profiler)", ["benchmarks/profile_step.py"], rows)
    run("Megatron load from a bf16 HF checkpoint", ["benchmarks/megatron_load.py"], rows)
    _compile_ratio(rows)
    out = HERE / "RESULTS.md"
    lines = ["# Benchmark results", "",
             f"`make bench` on {datetime.date.today()}, {os.cpu_count()} CPUs, {time.perf_counter() - t0:.0f} s "
             "in all. Every ratio is measured within one run (see benchmarks/README.md); the load average "
             "is shown before → after each benchmark.", "",
             "| benchmark | result | load average |", "|---|---|---|"]
    lines += [f"| {t} | {r} | {load} |" for t, r, load in rows]
    out.write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _compile_ratio(rows: list[tuple[str, str, str]]) -> None:
    vals = [float(m.group(1)) for _, r, _ in rows if (m := re.match(r"ratio ours/hand-loop: ([\d.]+)", r))]
    if len(vals) == 2:
        rows.append(("torch.compile on ÷ off (derived)", f"ratio compile on ÷ off: {vals[1] / vals[0]:.2f}", "-"))


if __name__ == "__main__":
    sys.exit(main())
