"""The cheapest changes that make a job fit, or why nothing does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nemo_automodel.errors import ConfigError
from nemo_automodel.plan.accounting import GRADIENTS, OPTIMIZER, WEIGHTS, MemoryEstimate, estimate
from nemo_automodel.plan.job import TrainingJob
from nemo_automodel.plan.units import GIB, gib, human
from nemo_automodel.trainer.precision import cpu_bf16_flags

MAX_DEVICES = 4096


@dataclass(frozen=True)
class Change:
    """One setting to change: the recipe override, what it does, and the job it gives. ``keep``: it costs no
    throughput (bf16 where the device computes it natively), so once chosen it is never dropped."""

    override: str
    why: str
    apply: Callable[[TrainingJob], TrainingJob]
    keep: bool = False


def _micro_batch(m: int) -> Callable[[TrainingJob], TrainingJob]:
    """The job with micro-batches of ``m`` rows (a divisor of the current size) and the same global batch."""
    return lambda j: j.replace(micro_batch_size=m, accumulate=j.accumulate * (j.micro_batch_size // m))


def native_bf16(job: TrainingJob) -> bool:
    """Whether the job's device computes bf16 natively: a planned GPU does (every training GPU since Ampere); a
    CPU when it has ``avx512_bf16``/``amx_bf16`` (elsewhere bf16 is emulated, far slower than fp32)."""
    return job.device == "cuda" or bool(cpu_bf16_flags())


def _ladder(job: TrainingJob) -> list[Change | list[Change]]:
    """Changes in order of cost (throughput, then quality); a list is alternatives, first that fits wins."""
    steps: list[Change | list[Change]] = []
    if not job.chunked_loss:
        steps.append(Change("model.chunked_loss=True", "never materialize the [tokens, vocab] logits",
                            lambda j: j.replace(chunked_loss=True)))
    native = native_bf16(job)  # bf16 is then faster than fp32 too: a change that is kept once chosen
    if native and job.peft is not None and job.weight_dtype == torch.float32 and not job.quantization:
        steps.append(Change("trainer.precision=bf16-true", "bf16 frozen base (faster); adapters and their AdamW "
                            "state fp32", lambda j: j.replace(precision="bf16-true"), keep=True))
    elif native and job.peft is None and job.precision == "32" and job.weight_dtype == torch.float32:
        steps.append(Change("trainer.precision=bf16-mixed", "bf16 activations over fp32 weights (faster)",
                            lambda j: j.replace(precision="bf16-mixed"), keep=True))
    if job.devices > 1 and job.effective_strategy != "fsdp2" and not job.quantization:
        where = f"{job.devices} {'GPUs' if job.device == 'cuda' else 'processes'}"
        steps.append(Change("trainer.strategy=fsdp2", f"shard weights, gradients and optimizer state over {where}",
                            lambda j: j.replace(strategy="fsdp2")))
    sizes = [m for m in range(job.micro_batch_size - 1, 0, -1) if job.micro_batch_size % m == 0]  # same global batch
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


def recommend(job: TrainingJob, budget: float, allowed: Callable[[TrainingJob], bool] | None = None) -> Advice:
    """The cheapest settings under which ``job`` fits ``budget`` bytes per device: the shortest prefix of
    `_ladder` (cheapest first) that fits, less the changes it then does not need (the costliest dropped first;
    a ``keep`` change stays), each alternatives step at its largest option that still fits. ``allowed``: only
    changes giving a job it accepts are tried (`nemo_automodel.plan.fit` leaves out what must be asked for)."""
    steps = [[o for o in (s if isinstance(s, list) else [s]) if allowed is None or allowed(o.apply(job))]
             for s in _ladder(job)]
    chosen: list[tuple[list[Change], int]] = []  # (the step's options, the one chosen)
    result = None
    for options in (s for s in steps if s):
        for i, option in enumerate(options):
            candidate = estimate(_apply(job, [*_changes(chosen), option]))
            if fits(candidate, budget):
                chosen.append((options, i))
                result = candidate
                break
        else:
            chosen.append((options, len(options) - 1))
            continue
        break
    if result is None:
        return Advice(tuple(_changes(chosen)), None, _why_not(_apply(job, _changes(chosen)), budget))
    for k in range(len(chosen) - 2, -1, -1):  # the last change is the one that made it fit
        options, i = chosen[k]
        rest = chosen[:k] + chosen[k + 1:]
        if _apply(job, _changes(rest)) == _apply(job, _changes(chosen)):  # superseded (bf16-mixed by bf16-true)
            chosen = rest
            continue
        if options[i].keep:
            continue
        larger = [chosen[:k] + [(options, j)] + chosen[k + 1:] for j in range(i)]
        for trial in [rest, *larger]:  # dropped, else a larger alternative (the largest that fits)
            candidate = estimate(_apply(job, _changes(trial)))
            if fits(candidate, budget):
                chosen, result = trial, candidate
                break
    return Advice(tuple(_changes(chosen)), result)


def _changes(chosen: list[tuple[list[Change], int]]) -> list[Change]:
    return [options[i] for options, i in chosen]


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


def _size(n_bytes: float) -> str:
    return f"{gib(n_bytes):.1f} GiB" if n_bytes >= GIB else human(n_bytes)


def _why_not(job: TrainingJob, budget: float) -> str:
    """Why ``job`` (already with every change) does not fit: the largest part, and how many GPUs would do."""
    try:
        est = estimate(job)
    except ConfigError as err:
        return str(err)
    states = est.components[WEIGHTS] + est.components[GRADIENTS] + est.components[OPTIMIZER]
    dtype = "4-bit base's" if job.quantization else \
        str(job.weight_dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
    what = (f"the {dtype} weights alone are {_size(est.components[WEIGHTS])}"
            if est.components[WEIGHTS] > budget else
            f"weights, gradients and optimizer state are {_size(states)}" if states > budget else
            f"the smallest setting needs {_size(est.total)}")
    need = min_devices(job.replace(quantization=None), budget)  # FSDP2 shards no 4-bit base
    unit = "GPU" if job.device == "cuda" else "process"
    hint = (f"use >= {need} {unit}{'es' if unit == 'process' else 's'} with FSDP2 (trainer.devices={need} "
            f"trainer.strategy=fsdp2{', no quantization' if job.quantization else ''})" if need else
            f"not even {MAX_DEVICES} {unit}{'es' if unit == 'process' else 's'} with FSDP2 are enough")
    if job.peft is None:
        hint += " or LoRA/QLoRA (peft=lora model.quantization=nf4)"
    return f"{what} > {_size(budget)} per {unit} even with all of these: {hint}"
