"""The planner's prediction against the measured peak memory of real CPU training steps.

3 architectures (Llama, Qwen2 with tied embeddings, Gemma) x {LoRA, full} x {activation
checkpointing off, on} x sequence {1024, 2048} in fp32, three more precisions on Llama (bf16
autocast, bf16-true, QLoRA's 4-bit base), and six steps of the mixture-of-experts and Mamba/hybrid
families (Qwen3-MoE LoRA on attention and fused experts / full with checkpointing, Mixtral,
DeepSeek-V3 with MLA, Mamba2, Nemotron-H with LoRA; the router load-balancing loss on): 33 steps,
measured one after another (the small MoE/Mamba steps first) in one fresh worker process
(``measure_step.py``: peak ``RssAnon`` growth over one steady-state training step through our
model wrapper, loss, clipping and AdamW, with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go
back to the OS). The prediction is the planner's total for a CPU process minus what the worker
already held before the step: the weights and AdamW's state (created by its warm-up step). Every
case must be within 15 %; the table is printed (``-s``) and is in any failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_automodel.peft import LoRA
from nemo_automodel.plan import TrainingJob, estimate
from nemo_automodel.plan.accounting import OPTIMIZER, WEIGHTS
from tests.helpers import require_module
from tests.plan.measure_step import LORA, config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
# mixture-of-experts and Mamba/hybrid families (tests/conftest.py TINY_FAMILIES, vocabulary 512), measured first:
# their steps are small, so they go before the larger models have fragmented the heap. LoRA reaches the fused
# experts; the router load-balancing loss is on (the configs' own coefficient).
CASES = [dict(arch="qwen3_moe", lora=True, ckpt=False, seq=2048), dict(arch="qwen3_moe", lora=False, ckpt=True, seq=2048),
         dict(arch="mixtral", lora=False, ckpt=False, seq=2048),
         dict(arch="deepseek_v3", lora=False, ckpt=False, seq=1024),
         dict(arch="mamba2", lora=False, ckpt=False, seq=2048),
         dict(arch="nemotron_h", lora=True, ckpt=False, seq=2048)]
CASES += [dict(arch=arch, lora=lora, ckpt=ckpt, seq=seq) for arch in ("llama", "qwen2", "gemma")
          for lora in (True, False) for ckpt in (False, True) for seq in (1024, 2048)]
CASES += [dict(arch="llama", lora=True, ckpt=False, seq=1024, precision="bf16-mixed"),
          dict(arch="llama", lora=False, ckpt=True, seq=1024, precision="bf16-true"),
          dict(arch="llama", lora=True, ckpt=False, seq=1024, precision="bf16-true", quantization="nf4")]
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def measured() -> list[dict]:
    require_module("bitsandbytes", "the QLoRA case needs bitsandbytes: make venv installs '.[qlora]'")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "plan" / "measure_step.py"), json.dumps(CASES)],
                          capture_output=True, text=True, env=env, timeout=1500)
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and len(results) == len(CASES), proc.stderr[-3000:]
    return results


def predicted_growth(arch: str, lora: bool, ckpt: bool, seq: int, precision: str = "32",
                     quantization: str | None = None) -> float:
    est = estimate(TrainingJob(config(arch), peft=LoRA(**LORA) if lora else None, seq_length=seq,
                       activation_checkpointing=ckpt, device="cpu", precision=precision, quantization=quantization))
    return est.total - est.sizes[WEIGHTS] - est.sizes[OPTIMIZER]


def test_prediction_within_15_percent_of_the_measured_peak(measured):
    lines = ["| arch | method | precision | checkpointing | seq | predicted MiB | measured MiB | ratio | step s |",
             "|---|---|---|---|---|---|---|---|---|"]
    bad = []
    for case in measured:
        key = {k: case[k] for k in ("arch", "lora", "ckpt", "seq", "precision", "quantization")}
        predicted = predicted_growth(**key)
        ratio = predicted / case["growth"]
        method = ("QLoRA" if case["quantization"] else "LoRA") if case["lora"] else "full"
        lines.append(f"| {case['arch']} | {method} | {case['precision']} | {'on' if case['ckpt'] else 'off'} | "
                     f"{case['seq']} | {predicted / 2**20:.1f} | {case['growth'] / 2**20:.1f} | {ratio:.3f} | "
                     f"{case['seconds']:.1f} |")
        if abs(ratio - 1) > TOLERANCE:
            bad.append(key)
    table = "\n".join(lines)
    print("\n" + table)
    assert not bad, f"off by more than {TOLERANCE:.0%}: {bad}\n{table}"
