"""The cheapest changes that make a job fit, or why nothing does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nemo_automodel.errors import ConfigError
from nemo_automodel.plan.accounting import GRADIENTS, OPTIMIZER, WEIGHTS, MemoryEstimate, estimate
from nemo_automodel.plan.job import TrainingJob
from nemo_automodel.plan.units import gib

MAX_DEVICES = 4096


@dataclass(frozen=True)
class Change:
    """One setting to change: the recipe override, what it does, and the job it gives."""

    override: str
    why: str
    apply: Callable[[TrainingJob], TrainingJob]


def _micro_batch(m: int) -> Callable[[TrainingJob], TrainingJob]:
    """The job with micro-batches of ``m`` rows and the same global batch (more accumulation)."""
    return lambda j: j.replace(micro_batch_size=m, accumulate=j.accumulate * (j.micro_batch_size // m))


def _ladder(job: TrainingJob) -> list[Change | list[Change]]:
    """Changes in order of cost (throughput, then quality); a list is alternatives, first that fits wins."""
    steps: list[Change | list[Change]] = []
    if not job.chunked_loss:
        steps.append(Change("model.chunked_loss=True", "never materialize the [tokens, vocab] logits",
                            lambda j: j.replace(chunked_loss=True)))
    if job.peft is not None and job.weight_dtype == torch.float32 and not job.quantization:
        steps.append(Change("trainer.precision=bf16-true", "bf16 frozen base; adapters and their AdamW state fp32",
                            lambda j: j.replace(precision="bf16-true")))
    elif job.peft is None and job.precision == "32" and job.weight_dtype == torch.float32:
        steps.append(Change("trainer.precision=bf16-mixed", "bf16 activations over fp32 weights",
                            lambda j: j.replace(precision="bf16-mixed")))
    if job.devices > 1 and job.effective_strategy != "fsdp2" and not job.quantization:
        steps.append(Change("trainer.strategy=fsdp2", f"shard weights, gradients and optimizer state over "
                            f"{job.devices} GPUs", lambda j: j.replace(strategy="fsdp2")))
    sizes, mbs = [], job.micro_batch_size
    while mbs > 1:
        mbs //= 2
        sizes.append(mbs)
    if sizes:
        steps.append([Change(f"data.micro_batch_size={m}", f"{job.micro_batch_size // m}x more gradient accumulation "
                             "(same global batch)", _micro_batch(m))
                      for m in sizes])
    if not job.activation_checkpointing:
        steps.append(Change("model.activation_checkpointing=True", "keep one input per decoder layer, recompute "
                            "the rest in backward (~1.4x step time)", lambda j: j.replace(activation_checkpointing=True)))
    if job.peft is not None and not job.quantization and job.tensor_parallel * job.context_parallel == 1:
        ddp = job.devices > 1  # a 4-bit base is not FSDP2-shardable
        steps.append(Change("model.quantization=nf4" + (" trainer.strategy=ddp" if ddp else ""),
                            "QLoRA: 4-bit NF4 base (slower, slightly lower quality)",
                            lambda j: j.replace(quantization="nf4", strategy="ddp" if ddp else j.strategy)))
    if job.peft is None and job.precision != "bf16-true" and job.weight_dtype == torch.float32:
        steps.append(Change("trainer.precision=bf16-true", "bf16 weights and AdamW state, no fp32 master copy",
                            lambda j: j.replace(precision="bf16-true")))
    return steps


def _apply(job: TrainingJob, changes: list[Change]) -> TrainingJob:
    for change in changes:
        job = change.apply(job)
    return job


@dataclass(frozen=True)
class Advice:
    """``changes`` make the job fit and ``result`` is its estimate; or ``result`` is None, ``changes``
    are all the changes tried and ``reason`` says why even they do not fit."""

    changes: tuple[Change, ...]
    result: MemoryEstimate | None
    reason: str | None = None


def fits(est: MemoryEstimate, budget: float) -> bool:
    return est.total <= budget


def recommend(job: TrainingJob, budget: float) -> Advice:
    """The cheapest settings (fewest, earliest in `_ladder`'s order) under which ``job`` fits ``budget``
    bytes per device."""
    chosen: list[Change] = []
    result = None
    for step in _ladder(job):
        options = step if isinstance(step, list) else [step]
        for option in options:
            candidate = estimate(_apply(job, [*chosen, option]))
            if fits(candidate, budget):
                chosen.append(option)
                result = candidate
                break
        else:
            chosen.append(options[-1])
            continue
        break
    if result is None:
        return Advice(tuple(chosen), None, _why_not(_apply(job, chosen), budget))
    for change in list(chosen[:-1]):  # drop earlier changes that the later ones make unnecessary
        rest = [c for c in chosen if c is not change]
        candidate = estimate(_apply(job, rest))
        if fits(candidate, budget):
            chosen, result = rest, candidate
    return Advice(tuple(chosen), result)


def min_devices(job: TrainingJob, budget: float) -> int | None:
    """The fewest GPUs with which ``job`` fits under FSDP2 (None: not even with MAX_DEVICES); a multiple
    of tensor_parallel x context_parallel."""
    group = job.tensor_parallel * job.context_parallel

    def ok(n: int) -> bool:
        n *= group
        return fits(estimate(job.replace(devices=n, strategy="fsdp2" if n > 1 else None)), budget)

    hi = 1
    while not ok(hi):
        if hi * group >= MAX_DEVICES:
            return None
        hi *= 2
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return hi * group


def _why_not(job: TrainingJob, budget: float) -> str:
    """Why ``job`` (already with every change) does not fit: the largest part, and how many GPUs would do."""
    try:
        est = estimate(job)
    except ConfigError as err:
        return str(err)
    states = est.components[WEIGHTS] + est.components[GRADIENTS] + est.components[OPTIMIZER]
    dtype = "4-bit base's" if job.quantization else \
        str(job.weight_dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
    what = (f"the {dtype} weights alone are {gib(est.components[WEIGHTS]):.1f} GiB"
            if est.components[WEIGHTS] > budget else
            f"weights, gradients and optimizer state are {gib(states):.1f} GiB" if states > budget else
            f"the smallest setting needs {gib(est.total):.1f} GiB")
    need = min_devices(job.replace(quantization=None), budget)  # FSDP2 shards no 4-bit base
    hint = (f"use >= {need} GPUs with FSDP2 (trainer.devices={need} trainer.strategy=fsdp2"
            f"{', no quantization' if job.quantization else ''})" if need else
            f"not even {MAX_DEVICES} GPUs with FSDP2 are enough")
    if job.peft is None:
        hint += " or LoRA/QLoRA (peft=lora model.quantization=nf4)"
    return f"{what} > {gib(budget):.1f} GiB per GPU even with all of these: {hint}"
