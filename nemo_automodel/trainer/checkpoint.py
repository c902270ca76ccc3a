"""Crash-safe checkpoints: sharded training state with torch.distributed.checkpoint plus an HF export.

Layout of one checkpoint (written under a temporary name, renamed when complete, and only then
pointed at by the ``last`` symlink, which is switched atomically)::

    checkpoints/step-000100/
        state/            DCP shards: trainable params + optimizer (no rank-0 gather)
        trainer-rank{r}.pt  step, LR scheduler, data position and RNG states of rank r
        model/            HF safetensors + config + tokenizer   (full SFT)
        hf_adapter/       adapter_config.json + adapter_model.safetensors (LoRA)
        meta.json
    checkpoints/last -> step-000100
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from nemo_automodel.errors import ConfigError

log = logging.getLogger(__name__)
TMP_PREFIX = ".tmp-"


class ModelCheckpoint:
    """When to checkpoint: every N optimizer steps (None = only at the end), keeping the last K."""

    def __init__(self, every_n_train_steps: int | None = None, save_last: bool = True, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ConfigError(f"keep_last={keep_last!r} is invalid: keep at least 1 checkpoint")
        self.every_n_train_steps, self.save_last, self.keep_last = every_n_train_steps, save_last, keep_last


class AutoResume:
    """Resume from ``resume_from_path`` or, with ``resume_if_exists``, from the run's ``last`` checkpoint."""

    def __init__(self, resume_if_exists: bool = True, resume_from_path: str | None = None,
                 resume_ignore_no_checkpoint: bool = True) -> None:
        self.resume_if_exists = resume_if_exists
        self.resume_from_path = resume_from_path
        self.resume_ignore_no_checkpoint = resume_ignore_no_checkpoint

    def find(self, ckpt_root: Path) -> Path | None:
        """The checkpoint to resume from, or None to start fresh."""
        if self.resume_from_path:
            path = Path(self.resume_from_path)
            if not (path / "meta.json").is_file():
                raise ConfigError(f"resume_from_path={str(path)!r} is not a complete checkpoint (no meta.json)")
            return path.resolve()
        last = latest_checkpoint(ckpt_root) if self.resume_if_exists else None
        if last is None and not self.resume_ignore_no_checkpoint:
            raise ConfigError(f"no checkpoint to resume from in {ckpt_root}")
        return last


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The complete checkpoint ``last`` points at (never a half-written one)."""
    last = Path(ckpt_root) / "last"
    if last.is_symlink() and (last.resolve() / "meta.json").is_file():
        return last.resolve()
    return None


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


def _options(**kw) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=True, **kw)


def save_checkpoint(ckpt_root: Path, step: int, *, model, module, optimizer, scheduler, data, strategy,
                    keep_last: int = 2, metrics: dict | None = None) -> Path:
    """Write checkpoint ``step`` on every rank; returns its final path."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f"{TMP_PREFIX}{final.name}"
    if strategy.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    strategy.barrier()

    model_sd, optim_sd = get_state_dict(module, optimizer, options=_options())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "data": data.state_dict(), "rng": _rng_state()},
               tmp / f"trainer-rank{strategy.rank}.pt")
    _export_hf(tmp, model=model, module=module, strategy=strategy)
    strategy.barrier()

    if strategy.rank == 0:
        meta = {"step": step, "world_size": strategy.world_size, "peft": _is_peft(model.model),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "metrics": metrics or {}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _point_last(ckpt_root, final)
        _prune(ckpt_root, keep_last)
    strategy.barrier()
    return final


def _is_peft(hf_model) -> bool:
    return hasattr(hf_model, "peft_config")


def _export_hf(out: Path, *, model, module, strategy) -> None:
    """Consolidated export next to the state: PEFT adapter (LoRA) or HF safetensors (full SFT)."""
    peft = _is_peft(model.model)
    full = get_model_state_dict(module, options=StateDictOptions(
        full_state_dict=True, cpu_offload=strategy.is_distributed, ignore_frozen_params=peft))
    if strategy.rank == 0:
        full = {k.removeprefix("module."): v for k, v in full.items()}
        model.save_pretrained(out / ("hf_adapter" if peft else "model"), state_dict=full)


def _point_last(ckpt_root: Path, target: Path) -> None:
    link = ckpt_root / ".last.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target.name, link)
    os.replace(link, ckpt_root / "last")


def _prune(ckpt_root: Path, keep_last: int) -> None:
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "meta.json").is_file())
    keep = set(done[-keep_last:]) | {latest_checkpoint(ckpt_root)}
    for path in done:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for stale in ckpt_root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: Path, *, module, optimizer, scheduler, data, strategy) -> int:
    """Restore params, optimizer, scheduler, data position and RNG; returns the step to continue from."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    model_sd, optim_sd = get_state_dict(module, optimizer, options=_options())
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "state"))
    # strict=False: frozen base weights are not in the checkpoint, they come from the pretrained model
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(strict=False))
    own = path / f"trainer-rank{strategy.rank}.pt"
    trainer_state = torch.load(own if own.is_file() else path / "trainer-rank0.pt", weights_only=False)
    scheduler.load_state_dict(trainer_state["scheduler"])
    if meta["world_size"] == strategy.world_size:
        data.load_state_dict(trainer_state["data"])
        _set_rng_state(trainer_state["rng"])
    else:
        log.warning("resuming %s saved with world size %d on %d ranks: weights, optimizer and schedule carry "
                    "over; the data order restarts at the saved epoch and RNG streams are reseeded",
                    path.name, meta["world_size"], strategy.world_size)
        data.load_state_dict({"epoch": trainer_state["data"].get("epoch", 0), "batch_in_epoch": 0})
    return int(meta["step"])
