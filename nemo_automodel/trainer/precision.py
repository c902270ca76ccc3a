"""``precision="auto"``: the training precision for the hardware the job runs on, decided from what the device
says it can do (CUDA's bf16 support, the CPU's instruction flags), never guessed.

- CUDA with bf16: ``bf16-true`` for LoRA/QLoRA (the frozen base in bf16; peft keeps the adapters, and so their
  optimizer state, in fp32), ``bf16-mixed`` for full fine-tuning (fp32 master weights, bf16 autocast).
- CUDA without bf16 (pre-Ampere): fp32 (fp16 autocast is not offered).
- CPU with native bf16 instructions (``avx512_bf16`` or ``amx_bf16``): ``bf16-mixed``, 1.38x fp32 on an
  AVX-512-BF16 CPU (FACTS.md); elsewhere fp32, since bf16 is emulated there (one step took minutes on AVX2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

AUTO = "auto"
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Hardware:
    """What the precision choice depends on: ``kind`` ``"cuda"`` | ``"cpu"``, whether it computes bf16
    natively, and in words why (``"NVIDIA H100"``, ``"avx512_bf16"``)."""

    kind: str
    bf16: bool
    detail: str


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native bf16 instruction flags this CPU lists in ``/proc/cpuinfo`` (none where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [f for f in NATIVE_BF16_CPU_FLAGS if f in flags]


def detect(device: torch.device) -> Hardware:
    """The hardware of ``device`` as the choice needs it."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return Hardware("cuda", torch.cuda.is_bf16_supported(), name)
    flags = cpu_bf16_flags()
    return Hardware("cpu", bool(flags), ", ".join(flags) or "no avx512_bf16/amx_bf16")


def choose_precision(hardware: Hardware, peft: bool, cpu_autocast: bool = True) -> tuple[str, str]:
    """``(precision, reason)`` for ``hardware``, LoRA/QLoRA (``peft``) or full fine-tuning; ``cpu_autocast``: the
    strategy's model can train under bf16 autocast on CPU (Megatron's cannot)."""
    method = "LoRA" if peft else "full fine-tuning"
    if hardware.kind == "cuda":
        if not hardware.bf16:
            return "32", f"CUDA ({hardware.detail}) without bf16 support"
        return ("bf16-true" if peft else "bf16-mixed"), f"CUDA ({hardware.detail}), bf16 supported, {method}"
    if hardware.bf16 and not cpu_autocast:
        return "32", f"CPU with native bf16 ({hardware.detail}), but this strategy's model has no bf16 autocast on CPU"
    if hardware.bf16:
        return "bf16-mixed", f"CPU with native bf16 ({hardware.detail})"
    return "32", f"CPU without native bf16 ({hardware.detail}): bf16 would be emulated"


def planned_precision(device: str, peft: bool) -> tuple[str, str]:
    """What ``"auto"`` becomes for a job planned on ``device`` (``"cuda"``: a GPU with bf16, as every 40/80 GiB
    training GPU since Ampere; ``"cpu"``: this machine's CPU)."""
    hardware = Hardware("cuda", True, "planned GPU") if device == "cuda" else detect(torch.device("cpu"))
    return choose_precision(hardware, peft)
