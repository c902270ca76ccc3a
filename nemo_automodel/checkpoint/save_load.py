"""Crash-safe checkpoints: sharded training state with torch.distributed.checkpoint plus an HF export.

Layout of one checkpoint (written under a temporary name, renamed when complete, and only then
pointed at by the ``last`` symlink, which is switched atomically)::

    checkpoints/step-000100/
        state/              DCP shards: trainable params + optimizer (each rank writes its own)
        trainer-rank{r}.pt  step, LR scheduler, data position and RNG states of rank r
        model/              HF safetensors + config + tokenizer   (full SFT)
        hf_adapter/         adapter_config.json + adapter_model.safetensors (LoRA)
        meta.json           written last: its presence marks the checkpoint complete; it records
                            every other file's size and SHA-256, checked before resuming
    checkpoints/last -> step-000100

A process killed at any point leaves either the previous complete checkpoint as ``last`` or the
new one; half-written ``.tmp-*`` folders are never resumed from and are removed by the next save.
A checkpoint damaged later (a truncated shard, a lost file) is found before resuming: the newest
checkpoint that verifies is used instead (keep_last=2 by default keeps one to fall back on).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from nemo_automodel.checkpoint import checksums
from nemo_automodel.contracts import DataModule, Strategy, TrainableModel
from nemo_automodel.errors import ConfigError, RunError, check_int, first_line
from nemo_automodel.models.quantization import drop_quant_state

log = logging.getLogger(__name__)
TMP_PREFIX = ".tmp-"


class ModelCheckpoint:
    """When to checkpoint: every N optimizer steps (None = only at the end), keeping the last K.

    ``save_last`` is NeMo's argument: the final step is always checkpointed and ``last`` always
    points at the newest complete checkpoint, so only True is accepted.
    """

    def __init__(self, every_n_train_steps: int | None = None, save_last: bool = True, keep_last: int = 2) -> None:
        check_int("keep_last", keep_last)
        if save_last is not True:
            raise ConfigError(f"save_last={save_last!r} is invalid: the final step is always checkpointed; "
                              "use Trainer(enable_checkpointing=False) to write no checkpoint")
        self.every_n_train_steps, self.keep_last = every_n_train_steps, keep_last


class AutoResume:
    """Resume from ``resume_from_path`` or, with ``resume_if_exists``, from the run's ``last`` checkpoint."""

    def __init__(self, resume_if_exists: bool = True, resume_from_path: str | None = None,
                 resume_ignore_no_checkpoint: bool = True) -> None:
        self.resume_if_exists = resume_if_exists
        self.resume_from_path = resume_from_path
        self.resume_ignore_no_checkpoint = resume_ignore_no_checkpoint

    def find(self, ckpt_root: Path, strategy: Strategy | None = None) -> Path | None:
        """The checkpoint to resume from, or None to start fresh.

        Checkpoints verify themselves (``checksums``): a damaged ``last`` is reported in one warning
        line and the newest checkpoint that verifies is used instead; when none does, a RunError names
        the damage. Rank 0 reads the files; every rank of ``strategy`` gets its choice.
        """
        if self.resume_from_path:
            path = Path(self.resume_from_path)
            if not (path / "meta.json").is_file():
                raise ConfigError(f"resume_from_path={str(path)!r} is not a complete checkpoint (no meta.json)")
            why = checksums.damage(path) if _is_rank0(strategy) else None
            if _agreed_index(strategy, -1 if why else 0) < 0:
                raise RunError(f"resume_from_path={str(path)!r} is damaged: {why or 'see rank 0'}")
            return path.resolve()
        candidates = resume_candidates(ckpt_root) if self.resume_if_exists else []
        if not candidates:
            if not self.resume_ignore_no_checkpoint:
                raise ConfigError(f"no checkpoint to resume from in {ckpt_root}")
            return None
        damaged, pick = [], -1
        if _is_rank0(strategy):
            for i, ckpt in enumerate(candidates):
                why = checksums.damage(ckpt)
                if why is None:
                    pick = i
                    break
                damaged.append(f"{ckpt.name}: {why}")
                log.warning("checkpoint %s is damaged (%s): trying the one before it", ckpt, why)
        pick = _agreed_index(strategy, pick)
        if pick < 0:
            raise RunError(f"no checkpoint in {ckpt_root} verifies ({'; '.join(damaged) or 'see rank 0'}): "
                           "start a new run (another log name/dir) or restore the files")
        return candidates[pick]


def resume_candidates(ckpt_root: Path) -> list[Path]:
    """Checkpoints to try, best first: the one ``last`` points at, then every other ``step-*`` newest first."""
    ckpt_root = Path(ckpt_root)
    last = ckpt_root / "last"
    first = [last.resolve()] if last.is_symlink() and last.resolve().is_dir() else []
    rest = sorted((p.resolve() for p in ckpt_root.glob("step-*") if p.is_dir()), reverse=True)
    return first + [p for p in rest if p not in first]


def _is_rank0(strategy: Strategy | None) -> bool:
    return strategy is None or strategy.rank == 0


def _agreed_index(strategy: Strategy | None, index: int) -> int:
    """Rank 0's ``index`` (>= -1) on every rank."""
    if strategy is None or not strategy.is_distributed:
        return index
    mine = torch.tensor([float(index + 1 if strategy.rank == 0 else 0)], device=strategy.device)
    return int(strategy.all_reduce(mine, world=True).item()) - 1


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The complete checkpoint ``last`` points at; if that link is missing or broken, the newest complete one."""
    last = Path(ckpt_root) / "last"
    if last.is_symlink() and (last.resolve() / "meta.json").is_file():
        return last.resolve()
    done = sorted(p for p in Path(ckpt_root).glob("step-*") if (p / "meta.json").is_file())
    return done[-1].resolve() if done else None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _options(**kw: Any) -> Any:
    # torch.distributed.checkpoint is imported on use throughout: graph builds stay fast
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)


def _trainable_state(model_sd: dict, module: torch.nn.Module) -> dict:
    """The model state a checkpoint holds: the trainable weights. ``ignore_frozen_params`` drops a frozen
    weight under its first name only, so a tied output layer (``lm_head.weight`` = the embedding) stayed
    in every LoRA checkpoint; a 4-bit base's scales are frozen base too. Both come from the pretrained
    model again on resume."""
    frozen = {_address(p) for p in module.parameters() if not p.requires_grad} - {0}
    return {k: v for k, v in drop_quant_state(model_sd).items()
            if not (isinstance(v, torch.Tensor) and _address(v) in frozen)}


def _address(t: torch.Tensor) -> int:
    """Where the tensor's data starts: the same for a weight and its tied alias (not for two views of one
    memory-mapped file)."""
    local = t.to_local() if hasattr(t, "to_local") else t  # FSDP2: this rank's shard of a DTensor
    return local.data_ptr()


def save_checkpoint(ckpt_root: Path, step: int, *, model: TrainableModel, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, data: DataModule, strategy: Strategy,
                    keep_last: int = 2, metrics: dict | None = None, preempted: bool = False,
                    resumed_from: int = 0) -> Path:
    """Write checkpoint ``step`` on every rank; returns its final path. ``resumed_from`` (recorded in
    ``meta.json``) is the step this process started from. A failed write (a full disk) removes the
    partial folder and raises a one-line RunError naming the checkpoint that is kept."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f"{TMP_PREFIX}{final.name}"
    try:
        _write(tmp, step, model=model, module=module, optimizer=optimizer, scheduler=scheduler, data=data,
               strategy=strategy, meta={"preempted": preempted, "metrics": metrics or {}, "resumed_from": resumed_from})
        if strategy.rank == 0:
            if final.exists():  # a complete step-N left by a run killed before it moved `last`
                _remove(final)
            os.replace(tmp, final)
            _point_last(ckpt_root, final)
            _prune(ckpt_root, keep_last)
    except (OSError, _dcp_error()) as err:
        raise _write_failed(err, step, tmp, ckpt_root) from err
    strategy.barrier()
    return final


def _write(tmp: Path, step: int, *, model: TrainableModel, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: Any, data: DataModule, strategy: Strategy, meta: dict) -> None:
    """Every rank writes its part of checkpoint ``step`` into ``tmp``; rank 0 then records the
    checksums and writes ``meta.json`` last."""
    if strategy.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    strategy.barrier()

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer, options=_options())
    model_sd = _trainable_state(model_sd, module)
    dcp.save({"model": model_sd, "optim": optim_sd}, **_dcp_target(tmp, strategy))
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "data": data.state_dict(), "rng": _rng_state()},
               tmp / f"trainer-rank{strategy.rank}.pt")
    model.save_hf(tmp, module=module, strategy=strategy)
    strategy.barrier()
    if strategy.rank == 0:
        meta = {"step": step, "world_size": strategy.world_size, "dp_size": strategy.dp_size,
                "layout": strategy.checkpoint_layout(), "peft": model.is_peft,
                "micro_batch_size": data.micro_batch_size, **meta,
                "saved_at": time.time(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": checksums.record(tmp)}  # also fsyncs every file before meta.json marks it complete
        checksums.fsync(tmp)
        _write_durably(tmp / "meta.json", json.dumps(meta, indent=1))


def _dcp_error() -> type[BaseException]:
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _write_failed(err: BaseException, step: int, tmp: Path, ckpt_root: Path) -> RunError:
    """Remove the partial folder; one line with the path, the cause and the checkpoint that is kept."""
    cause = _os_error(err)
    where = getattr(cause, "filename", None) or tmp
    why = getattr(cause, "strerror", None) or first_line(cause)
    shutil.rmtree(tmp, ignore_errors=True)
    kept = latest_checkpoint(ckpt_root)
    after = (f"checkpoint step {checksums.read_meta(kept)['step']} ({kept}) is kept and the next run resumes from it"
             if kept is not None else "no earlier checkpoint exists")
    return RunError(f"checkpoint step {step} could not be written ({why}: {where}): the partial folder was "
                    f"removed; {after}")


def _os_error(err: BaseException) -> BaseException:
    """The OSError behind ``err`` (DCP wraps each rank's failure in a CheckpointException)."""
    seen = [err]
    for e in seen:
        if isinstance(e, OSError):
            return e
        wrapped = [pair[0] for pair in getattr(e, "failures", {}).values()]  # {rank: (exception, traceback)}
        seen.extend(x for x in (*wrapped, e.__cause__, e.__context__) if x is not None and x not in seen)
    return err


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _point_last(ckpt_root: Path, target: Path) -> None:
    link = ckpt_root / ".last.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target.name, link)
    os.replace(link, ckpt_root / "last")
    checksums.fsync(ckpt_root)


def _remove(path: Path) -> None:
    """Take a checkpoint out of the complete set atomically (rename), then delete it."""
    doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _prune(ckpt_root: Path, keep_last: int) -> None:
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "meta.json").is_file())
    keep = set(done[-keep_last:]) | {latest_checkpoint(ckpt_root)}
    for path in done:
        if path not in keep:
            _remove(path)
    for stale in ckpt_root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _dcp_target(ckpt: Path, strategy: Strategy) -> dict:
    """Where this rank's DCP state goes: ``state/`` (or ``state/tpNN/`` per tensor-parallel rank)."""
    sub, group = strategy.checkpoint_shard()
    if group is not None:
        return {"checkpoint_id": str(ckpt / "state" / sub), "process_group": group}
    return {"checkpoint_id": str(ckpt / "state"), "no_dist": not strategy.is_distributed}


def load_checkpoint(path: Path, *, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    data: DataModule, strategy: Strategy) -> int:
    """Restore params, optimizer, scheduler, data position and RNG; returns the step to continue from.

    Across a change of world size, DCP reshards weights and optimizer state and the schedule
    carries over; the data position carries over when the rows consumed so far fill whole
    micro-batches of the new layout (e.g. the same global batch), otherwise the epoch restarts.
    RNG streams are per rank, so they are restored only on the same world size and data-parallel size
    (the same 4 processes as (dp 2, tp 2) or (dp 4, tp 1) read different data positions).
    """
    path = Path(path)
    meta = checksums.read_meta(path)
    saved_layout, layout = _layout(meta), strategy.checkpoint_layout()
    if saved_layout != layout:
        raise ConfigError(f"{path} was saved with the model-parallel layout {saved_layout or 'none'}, this run uses "
                          f"{layout or 'none'}: resume with the same layout (e.g. the same tensor-parallel size)")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer, options=_options())
    state = {"model": _trainable_state(model_sd, module), "optim": optim_sd}
    dcp.load(state, **_dcp_target(path, strategy))
    # strict=False: frozen base weights are not in the checkpoint, they come from the pretrained model
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(strict=False))
    own = path / f"trainer-rank{strategy.rank}.pt"
    trainer_state = torch.load(own if own.is_file() else path / "trainer-rank0.pt", weights_only=False)
    scheduler.load_state_dict(trainer_state["scheduler"])
    if meta["world_size"] == strategy.world_size and meta.get("dp_size", meta["world_size"]) == strategy.dp_size:
        data.load_state_dict(trainer_state["data"])
        _set_rng_state(trainer_state["rng"])
    else:
        data.load_state_dict(_reshard_data_position(trainer_state["data"], meta, data, strategy.dp_size))
    return int(meta["step"])


def _layout(meta: dict) -> dict[str, int]:
    """The saved model-parallel layout (checkpoints before ``layout`` recorded only ``tensor_parallel``)."""
    if "layout" in meta:
        return meta["layout"]
    tp = meta.get("tensor_parallel", 1)
    return {"tensor_parallel": tp} if tp != 1 else {}


def _reshard_data_position(saved: dict, meta: dict, data: DataModule, world_size: int) -> dict:
    """Map a per-rank data position saved on ``meta['world_size']`` ranks onto ``world_size`` ranks."""
    epoch, batch = int(saved.get("epoch", 0)), int(saved.get("batch_in_epoch", 0))
    old_mbs, new_mbs = meta.get("micro_batch_size"), data.micro_batch_size
    rows = batch * old_mbs * meta.get("dp_size", meta["world_size"]) if old_mbs else None
    if rows is not None and new_mbs and rows % (new_mbs * world_size) == 0:
        log.warning("resuming step %d saved on %d ranks with %d: weights, optimizer, schedule and data position "
                    "carry over; RNG streams are reseeded", meta["step"], meta["world_size"], world_size)
        return {"epoch": epoch, "batch_in_epoch": rows // (new_mbs * world_size)}
    log.warning("resuming step %d saved on %d ranks with %d: weights, optimizer and schedule carry over; the "
                "data order restarts at epoch %d (the %s rows consumed do not fill whole micro-batches of the "
                "new layout) and RNG streams are reseeded", meta["step"], meta["world_size"], world_size, epoch, rows)
    return {"epoch": epoch, "batch_in_epoch": 0}
