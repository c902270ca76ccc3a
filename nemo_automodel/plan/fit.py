"""``Trainer(fit_memory=...)``: the planner's cheapest changes that fit a memory budget, applied to the job before
any weight loads, each said in one line.

The budget is a size (``"80GiB"``, ``"1.5GiB"``, ``"512MiB"``) or ``"auto"``: the device's free memory (CUDA:
``torch.cuda.mem_get_info``; CPU: ``MemAvailable``, capped by a cgroup memory limit, shared by the processes of
the node), the smallest over all ranks so that every rank makes the same changes. The job fits when its estimated
peak is at most the budget less ``RESERVE`` (the allocator's fragmentation; the estimate's error, within 5 % of
measured steps) and, on a CPU, less ``CPU_PROCESS_RESERVE`` (the tokenizer, the data and Python's own objects share the
budget there).

It makes only changes that leave the training the same computation (`recommend`'s ladder, cheapest first): the
chunked loss; bf16 where ``precision="auto"`` chose a bf16 precision (the device computes it natively); FSDP2
instead of DDP on several devices when ``strategy`` was left to the trainer; smaller micro-batches with more
accumulation (the same global batch); activation checkpointing. It never quantizes the base (QLoRA: the adapters
would train against 4-bit weights, and it needs bitsandbytes), never drops full fine-tuning's fp32 master weights
(``bf16-true``: small updates round away), and leaves an explicit precision or strategy as given: when only such
a change fits, the error names it, for the user to set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemo_automodel.contracts import PeftMethod
from nemo_automodel.errors import ConfigError, bad_value
from nemo_automodel.plan.accounting import MemoryEstimate, estimate
from nemo_automodel.plan.job import TrainingJob
from nemo_automodel.plan.recommend import Change, recommend
from nemo_automodel.plan.units import human, parse_memory

AUTO = "auto"
RESERVE = 0.05  # of the budget, kept free: the allocator's fragmentation, the estimate's error
# on a CPU, also the process's own memory besides the training tensors (tokenizer, data, Python objects): 30 MiB
# measured with SmolLM2's tokenizer and a small data set (tests/plan/fit_run.py)
CPU_PROCESS_RESERVE = 64 << 20
_HINT = "use None, 'auto' (the device's free memory) or a size such as '80GiB', '1.5GiB' or '512MiB'"
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def parse_fit_memory(value: Any) -> int | str | None:
    """``fit_memory`` as bytes, ``"auto"`` or None; anything else is a one-line ConfigError."""
    if value is None or value == AUTO:
        return value
    if not isinstance(value, str) or not value.strip()[-1:].isalpha():  # a size needs its unit
        raise bad_value("fit_memory", value, _HINT)
    try:
        return parse_memory(value, field="fit_memory")
    except ConfigError:
        raise bad_value("fit_memory", value, _HINT) from None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory this process's cgroup may still take (its limit less its usage), None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is not None and limit < _NO_LIMIT:
            return max(0, limit - (usage or 0))
    return None


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ConfigError("fit_memory='auto': /proc/meminfo has no MemAvailable; give a size such as '16GiB'")


def free_memory(device: torch.device, processes: int | None = None) -> tuple[int, str]:
    """(bytes this process may use on ``device``, where the number comes from); on a CPU, the node's share of one
    of its ``processes`` (default: the launcher's ``LOCAL_WORLD_SIZE``)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {torch.cuda.get_device_name(device)}"
    free, source = mem_available(), "MemAvailable"
    room = cgroup_room()
    if room is not None and room < free:
        free, source = room, "the cgroup's memory limit less its usage"
    processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if processes > 1:  # the node's processes share its memory
        free, source = free // processes, f"{source} / {processes} processes on this node"
    return free, source


def _smallest_over_ranks(n_bytes: int, device: torch.device) -> int:
    """The smallest of every rank's ``n_bytes`` (free memory differs a little between ranks; their changes must not)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n_bytes
    value = torch.tensor([float(n_bytes)], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


@dataclass(frozen=True)
class Fitting:
    """A job against a budget: ``before`` as configured; ``changes`` (none when it fits) give ``job`` and ``after``."""

    budget: int
    before: MemoryEstimate
    changes: tuple[Change, ...] = ()
    after: MemoryEstimate | None = None

    @property
    def job(self) -> TrainingJob:
        return (self.after or self.before).job

    @property
    def target(self) -> float:
        """The most the estimate may be: the budget less ``RESERVE`` (and ``CPU_PROCESS_RESERVE`` on a CPU)."""
        return self.budget * (1 - RESERVE) - (CPU_PROCESS_RESERVE if self.before.job.device == "cpu" else 0)

    @property
    def kept(self) -> str:
        """What the target keeps free, in words."""
        return f"{RESERVE:.0%}" + (f" and {human(CPU_PROCESS_RESERVE)} for the process" if self.before.job.device == "cpu"
                                   else "")

    def lines(self, source: str = "", dry: bool = False) -> list[str]:
        """What ``fit_memory`` says: the budget and the estimate, one line per change, the new estimate; ``dry``:
        what it would change (``--dryrun``)."""
        where = "GPU" if self.before.job.device == "cuda" else "process"
        head = f"fit_memory: budget {human(self.budget)} per {where}{f' ({source})' if source else ''}"
        if not self.changes:
            return [f"{head}; the job fits as configured (estimated peak {human(self.before.total)}, {self.kept} "
                    "kept free)"]
        lines = [f"{head}; estimated peak {human(self.before.total)} as configured, "
                 f"{'it would change' if dry else 'changing'}:"]
        lines += [f"fit_memory:   {c.override:<38} {c.why}" for c in self.changes]
        assert self.after is not None
        lines.append(f"fit_memory: estimated peak {'then' if dry else 'now'} {human(self.after.total)} <= "
                     f"{human(self.target)} (the budget less {self.kept})")
        return lines


def refusal(job: TrainingJob, changed: TrainingJob, precision_adjustable: bool = True,
            strategy_adjustable: bool = True) -> str | None:
    """Why ``fit_memory`` does not turn ``job`` into ``changed`` by itself (None: it may)."""
    if changed.quantization != job.quantization:
        return "a 4-bit base (QLoRA) changes the weights the adapters train against"
    if changed.precision != job.precision:
        if changed.peft is None and changed.precision == "bf16-true":
            return "bf16-true full fine-tuning keeps no fp32 master weights"
        if not precision_adjustable:
            return "the trainer's precision was given explicitly or chose fp32 for this device"
    if changed.strategy != job.strategy and not strategy_adjustable:
        return "the trainer's strategy was given explicitly"
    return None


def fit_job(job: TrainingJob, budget: int, *, precision_adjustable: bool = True,
            strategy_adjustable: bool = True) -> Fitting:
    """``job`` as it is when it fits ``budget`` bytes per device (less ``RESERVE``), else with `recommend`'s cheapest
    changes that ``fit_memory`` may make; a one-line ConfigError naming the smallest setup that would fit otherwise."""
    before = estimate(job)
    fitting = Fitting(budget, before)
    if fitting.target <= 0:
        raise ConfigError(f"fit_memory={human(budget)} is no more than the {fitting.kept} it keeps free: give a larger "
                          f"budget (the job's estimated peak is {human(before.total)})")
    if before.total <= fitting.target:
        return fitting

    def why_not(changed: TrainingJob) -> str | None:
        return refusal(job, changed, precision_adjustable, strategy_adjustable)

    advice = recommend(job, fitting.target, allowed=lambda changed: why_not(changed) is None)
    if advice.result is not None:
        return Fitting(budget, before, advice.changes, advice.result)
    head = (f"fit_memory={human(budget)}: the job's estimated peak {human(before.total)} does not fit "
            f"{human(fitting.target)} (the budget less {fitting.kept})")
    anything = recommend(job, fitting.target)  # with the changes fit_memory leaves to the user
    if anything.result is None:
        tried = " ".join(c.override for c in anything.changes)
        raise ConfigError(f"{head} even with {tried or 'every change'}: {anything.reason}")
    asked = [(c.override, why_not(c.apply(job))) for c in anything.changes]
    yours = "; ".join(f"{override}: {reason}" for override, reason in asked if reason)
    raise ConfigError(f"{head} with what it changes by itself; {' '.join(o for o, _ in asked)} would fit "
                      f"({human(anything.result.total)}), but fit_memory leaves this to you ({yours}): set it in the "
                      f"job; or, without it: {advice.reason}")


# -- the live job --------------------------------------------------------------------------------------
def job_of(model: Any, data: Any, peft: PeftMethod | None, strategy: Any, precision: str,
           accumulate: int) -> TrainingJob:
    """The `TrainingJob` that the trainer's set-up strategy, resolved ``precision`` and these objects describe."""
    from nemo_automodel.models.hf_causal_lm import HFAutoModelForCausalLM

    if not isinstance(model, HFAutoModelForCausalLM):
        raise ConfigError(f"fit_memory plans HFAutoModelForCausalLM jobs; {type(model).__name__} is not estimated: "
                          "set fit_memory=None")
    if model.model is not None:
        raise ConfigError("fit_memory plans before the weights load, but this model is already loaded "
                          "(configure_model ran before fit): pass a model that is not loaded yet, or fit_memory=None")
    fields = ("micro_batch_size", "seq_length", "packed_sequence_size", "global_batch_size")
    missing = [f for f in fields if not hasattr(data, f)]
    if missing:
        raise ConfigError(f"fit_memory plans data modules with micro-batches ({type(data).__name__} has no "
                          f"{missing[0]}): set fit_memory=None")
    if strategy.name not in ("single", "ddp", "fsdp2"):
        raise ConfigError(f"fit_memory plans the single, DDP and FSDP2 strategies, not {type(strategy).__name__}: "
                          "set fit_memory=None")
    if getattr(strategy, "expert_parallel_size", 1) > 1:
        raise ConfigError("fit_memory does not plan expert parallelism (its all-to-all dispatch is not modelled): "
                          "set fit_memory=None or expert_parallel_size=1")
    packed = int(data.packed_sequence_size or 0)
    if data.global_batch_size:
        accumulate = data.global_batch_size // (data.micro_batch_size * strategy.dp_size)
    return TrainingJob(
        model=model.model_id, peft=peft, precision=precision, torch_dtype=str(model.dtype).removeprefix("torch."),
        quantization=model.quantization, strategy=strategy.name, devices=strategy.world_size,
        micro_batch_size=data.micro_batch_size, seq_length=packed or data.seq_length, packed=bool(packed),
        activation_checkpointing=model.activation_checkpointing,
        chunked_loss=bool(model.chunked_loss or model.use_liger_kernel), accumulate=max(1, accumulate),
        device=strategy.device.type, trust_remote_code=model.trust_remote_code,
        router_aux_loss_coef=model.router_aux_loss_coef, tensor_parallel=getattr(strategy, "tensor_parallel_size", 1),
        context_parallel=getattr(strategy, "context_parallel_size", 1), tp_plan=getattr(strategy, "tp_plan", None))


@dataclass(frozen=True)
class Fitted:
    """What the trainer applies to itself after `fit_to_budget`: its precision, strategy name (None: unchanged) and
    micro-batches per step when the data module has no global batch size."""

    precision: str
    strategy: str | None
    accumulate: int


def fit_to_budget(fit_memory: int | str, model: Any, data: Any, peft: PeftMethod | None, strategy: Any, *,
                  precision: str, precision_auto: bool, strategy_auto: bool, accumulate: int) -> Fitted:
    """Plan the job on the set-up ``strategy`` against ``fit_memory``, apply the changes to ``model`` and ``data``
    (rank 0 prints them) and return the trainer's part. ``precision_auto``/``strategy_auto``: the trainer chose them."""
    source = ""
    if fit_memory == AUTO:
        budget, source = free_memory(strategy.device)
        smallest = _smallest_over_ranks(budget, strategy.device)
        budget, source = smallest, source + (", the least over the ranks" if smallest != budget else "")
    else:
        budget = int(fit_memory)
    job = job_of(model, data, peft, strategy, precision, accumulate)
    fitting = fit_job(job, budget, precision_adjustable=precision_auto and precision != "32",
                      strategy_adjustable=strategy_auto)
    if strategy.rank == 0:
        print("\n".join(fitting.lines(source)), flush=True)
    new = fitting.job
    model.chunked_loss = model.chunked_loss or new.chunked_loss
    model.activation_checkpointing = new.activation_checkpointing
    data.micro_batch_size = new.micro_batch_size
    return Fitted(new.precision, new.strategy if new.strategy != job.strategy else None,
                  accumulate if data.global_batch_size else new.accumulate)
