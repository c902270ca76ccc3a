"""The plan as text: a component table, the verdict and the recommendations."""

from __future__ import annotations

from nemo_automodel.plan.accounting import MemoryEstimate
from nemo_automodel.plan.recommend import Advice
from nemo_automodel.plan.units import gib

TIGHT = 0.05  # a margin below this share of the budget is called out


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def describe(est: MemoryEstimate) -> str:
    """One line naming the job's settings."""
    job = est.job
    quant = job.quant_type  # set exactly when the base is 4-bit
    method = (f"QLoRA (4-bit {quant.upper()} base)" if quant else "LoRA") if job.peft is not None \
        else "full fine-tuning"
    where = {"single": "1 device", "ddp": f"DDP over {job.devices} devices",
             "fsdp2": f"FSDP2 over {job.devices} devices"}[job.effective_strategy]
    if job.tensor_parallel * job.context_parallel > 1:
        where += f" (dp {job.data_parallel} x cp {job.context_parallel} x tp {job.tensor_parallel})"
    if job.device == "cuda":
        where = where.replace("device", "GPU")
    dtype = str(job.torch_dtype).removeprefix("torch.")
    return (f"{est.architecture}, {_count(est.params)} parameters, {method} ({_count(est.trainable)} trainable), "
            f"precision {job.precision} (torch_dtype {dtype}), {where}; micro batch {job.micro_batch_size} x "
            f"{job.seq_length} tokens{' (packed)' if job.packed else ''}, activation checkpointing "
            f"{'on' if job.activation_checkpointing else 'off'}, chunked loss {'on' if job.chunked_loss else 'off'}")


def table(est: MemoryEstimate) -> list[str]:
    unit = "GiB per GPU" if est.job.device == "cuda" else "GiB per process"
    width = max(len(k) for k in est.components) + 2
    lines = [f"  {'component':<{width}}{unit:>16}"]
    lines += [f"  {name:<{width}}{gib(value):>16.2f}" for name, value in est.components.items()]
    lines.append(f"  {'peak':<{width}}{gib(est.total):>16.2f}   (during the {est.phase})")
    return lines


def render(est: MemoryEstimate, budget: float | None = None, advice: Advice | None = None) -> str:
    """The plan: settings, the table, the verdict against ``budget`` bytes per device, the advice."""
    device = "GPU" if est.job.device == "cuda" else "process"
    lines = [f"memory plan: {describe(est)}", *table(est)]
    lines += [f"  note: {note}" for note in est.notes]
    if budget is None:
        lines.append("  no memory budget given: `nemo automodel plan … --gpu-memory 80GiB` says whether it fits")
        return "\n".join(lines)
    margin = budget - est.total
    if margin >= 0:
        tight = ("; less than 5 % to spare: the caching allocator's fragmentation may need it"
                 if margin < TIGHT * budget and est.job.device == "cuda" else "")
        lines.append(f"verdict: fits in {gib(budget):.1f} GiB per {device} ({gib(margin):.1f} GiB to spare{tight})")
        return "\n".join(lines)
    lines.append(f"verdict: does not fit in {gib(budget):.1f} GiB per {device} ({gib(-margin):.1f} GiB over)")
    if advice is None:
        return "\n".join(lines)
    if advice.result is None:
        tried = " ".join(c.override for c in advice.changes)
        lines.append(f"nothing in reach fits{' (tried ' + tried + ')' if tried else ''}: {advice.reason}")
        return "\n".join(lines)
    lines.append("to fit, change (cheapest first):")
    lines += [f"  {c.override:<38} {c.why}" for c in advice.changes]
    lines.append(f"  -> {gib(advice.result.total):.2f} GiB per {device} "
                 f"({gib(budget - advice.result.total):.1f} GiB to spare)")
    return "\n".join(lines)
