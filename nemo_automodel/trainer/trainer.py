"""The training loop: a readable loop of our own (no Lightning), driven by plain arguments."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nemo_automodel.checkpoint.save_load import AutoResume, ModelCheckpoint, load_checkpoint, save_checkpoint
from nemo_automodel.contracts import DataModule, OptimizerModule, PeftMethod, Strategy, TrainableModel
from nemo_automodel.errors import ConfigError, RunError, bad_value, check_int, first_line
from nemo_automodel.parallel.strategy import env_world_size, resolve_strategy
from nemo_automodel.tracking.metrics import MetricsLogger
from nemo_automodel.tracking.trackers import MLflowLogger, Tracker, WandbLogger, check_trackers, object_params
from nemo_automodel.trainer.callbacks import as_callback
from nemo_automodel.trainer.optim import default_optimizer
from nemo_automodel.trainer.precision import AUTO, choose_precision, detect
from nemo_automodel.trainer.spawn import launch_fit, needs_launch

logger = logging.getLogger(__name__)  # not `log`: fit's NeMoLogger argument has that name

# precision -> (autocast dtype, weight dtype): "-mixed" autocasts over the model's weights; "bf16-true"
# loads the weights in bf16 (frozen base bf16; peft keeps LoRA adapters and so their AdamW state fp32)
PRECISIONS = {"32": (None, None), "32-true": (None, None), "bf16-mixed": (torch.bfloat16, None),
              "bf16": (torch.bfloat16, None), "bf16-true": (None, torch.bfloat16)}
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" — the job checkpointed on SIGTERM and can be requeued


@dataclasses.dataclass
class TrainingSetup:
    """What ``Trainer._setup`` built where the job runs: the wrapped module, the optimizer and its schedule,
    micro-batches per optimizer step and the number of optimizer steps."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    accumulate: int
    max_steps: int


class NeMoLogger:
    """Where a run writes: ``<log_dir>/<name>/`` (checkpoints, metrics.jsonl, tensorboard, loss.png).

    ``wandb=WandbLogger(...)`` / ``mlflow=MLflowLogger(...)`` (``tracking/trackers.py``) also send the
    params, every metrics row and loss.png to those trackers from rank 0. ``params``: the run's
    configuration as a flat dict; a recipe graph launched with ``run_graph``, the recipe CLI or
    ``Experiment`` gets its flattened values here (``nemo_automodel.launch.tracker_params``), and a
    plain-Python run records `trackers.object_params` updated with what is given.
    """

    def __init__(self, log_dir: str = "nemo_experiments", name: str = "default",
                 ckpt: ModelCheckpoint | None = None, tensorboard: bool = True,
                 wandb: WandbLogger | None = None, mlflow: MLflowLogger | None = None,
                 params: dict[str, Any] | None = None) -> None:
        for field, value, cls in (("wandb", wandb, WandbLogger), ("mlflow", mlflow, MLflowLogger)):
            if value is not None and not isinstance(value, cls):
                raise bad_value(f"NeMoLogger: {field}", value, f"use None or nemo_automodel.lightning.{cls.__name__}(...)")
        if params is not None and not isinstance(params, dict):
            raise bad_value("NeMoLogger: params", params, "use None or a dict of name -> value")
        self.log_dir, self.name, self.tensorboard = log_dir, name, tensorboard
        self.ckpt = ckpt or ModelCheckpoint()
        self.wandb, self.mlflow, self.params = wandb, mlflow, params

    @property
    def trackers(self) -> list[Tracker]:
        return [t for t in (self.wandb, self.mlflow) if t is not None]

    @property
    def run_dir(self) -> Path:
        return Path(self.log_dir) / self.name


def _timed_out(err: RuntimeError) -> bool:
    """A collective's timeout, as gloo ("Timed out waiting 5000ms for recv") and NCCL's watchdog word it."""
    text = str(err).lower()
    return "timed out waiting" in text or "collective operation timeout" in text


class Trainer:
    """Fit a model on a data module.

    Lightning/NeMo-style arguments; ``max_steps`` counts optimizer steps. ``precision`` is
    ``'auto'`` (the default: chosen for the device at setup and printed, ``trainer/precision.py``), ``'32'``,
    ``'bf16-mixed'`` (bf16 autocast over the model's weights) or ``'bf16-true'`` (weights
    loaded in bf16; LoRA adapters and their optimizer state stay fp32; full SFT then trains bf16
    weights without fp32 master copies, and says so). ``strategy`` is None (DDP on several processes,
    else one device), ``'ddp'``, ``'fsdp2'`` or any object with the ``contracts.Strategy`` members.
    ``callbacks``: ``trainer.callbacks.Callback`` subclasses, or objects defining any of its hooks
    ``on_train_start(trainer, module)``, ``on_train_step_end(trainer, step, metrics)`` and
    ``on_train_end(trainer)``. ``trainer.model`` is the model being fitted, from ``fit`` on.

    ``fit_memory``: None (off), ``"auto"`` (the device's free memory) or a size (``"80GiB"``, ``"512MiB"``): before
    any weight loads, the memory planner's cheapest changes that fit it are applied to the job and printed, one line
    each (chunked loss, bf16 under ``precision="auto"``, FSDP2, smaller micro-batches with the same global batch,
    activation checkpointing); when nothing it may change fits, one line names what would (``plan/fit.py``).

    Lightning arguments this loop has no use for: ``num_sanity_val_steps`` other than 0 and
    ``use_distributed_sampler`` (the data module always splits batches over the data-parallel ranks with its
    own resumable sampler) warn once; ``logger`` is refused (trackers go on ``NeMoLogger(wandb=, mlflow=)``).

    Processes: under torchrun / NeMo-Run / Slurm+torchrun (WORLD_SIZE set) each process is one
    rank and ``devices`` is informational. From a plain ``python`` process, ``devices * num_nodes
    > 1`` makes ``fit`` start ``devices`` local workers itself with torchrun's elastic launcher
    (see ``trainer/spawn.py``: spawn, so guard the script with ``if __name__ == "__main__":``)
    and return rank 0's run directory; the weights are then in ``checkpoints/last``. Several
    nodes need a launcher (torchrun or NeMo-Run) on each node.

    On SIGTERM every rank finishes its step, a checkpoint is written, and the process exits with
    ``PREEMPTED_EXIT_CODE`` (75) so a requeued job resumes with ``AutoResume``.
    """

    def __init__(self, devices: int = 1, num_nodes: int = 1, accelerator: str = "auto",
                 strategy: Strategy | str | None = None,
                 max_steps: int = -1, max_epochs: int | None = None, accumulate_grad_batches: int = 1,
                 gradient_clip_val: float | None = None, precision: str | int = AUTO,
                 val_check_interval: int | float | None = None, limit_val_batches: int | float | None = None,
                 log_every_n_steps: int = 10, callbacks: list[Any] | None = None, seed: int = 1234,
                 enable_progress_bar: bool = True, enable_checkpointing: bool = True,
                 num_sanity_val_steps: int = 0, use_distributed_sampler: bool | None = None, logger: Any = None,
                 collective_timeout: float = 600.0, fit_memory: str | None = None) -> None:
        if str(precision) not in PRECISIONS and str(precision) != AUTO:
            raise bad_value("precision", precision, f"use 'auto' or one of {sorted(PRECISIONS)}")
        if accelerator not in ("auto", "cpu", "gpu", "cuda"):
            raise bad_value("accelerator", accelerator, "use 'auto', 'cpu' or 'gpu'")
        if max_steps <= 0 and not max_epochs:
            raise bad_value("max_steps", max_steps, "set max_steps > 0 or max_epochs")
        for field, value in (("accumulate_grad_batches", accumulate_grad_batches), ("devices", devices),
                             ("num_nodes", num_nodes), ("log_every_n_steps", log_every_n_steps)):
            check_int(field, value)
        _refuse_unused_lightning_args(num_sanity_val_steps, use_distributed_sampler, logger)
        if not isinstance(collective_timeout, (int, float)) or collective_timeout <= 0:
            raise bad_value("collective_timeout", collective_timeout, "use a number of seconds > 0")
        self.collective_timeout = float(collective_timeout)
        if fit_memory is not None:
            from nemo_automodel.plan.fit import parse_fit_memory

            parse_fit_memory(fit_memory)  # one line now, not after the processes start
        self.fit_memory = fit_memory
        self.devices, self.num_nodes, self.accelerator = devices, num_nodes, accelerator
        self._strategy_arg = strategy
        self.strategy: Strategy = resolve_strategy(strategy)  # validated now; None/'auto' is re-decided in fit
        self.max_steps, self.max_epochs = max_steps, max_epochs
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self._precision_arg = self.precision = str(precision)
        self.autocast_dtype, self.weight_dtype = PRECISIONS.get(self.precision, (None, None))  # "auto": in _setup
        self.val_check_interval, self.limit_val_batches = val_check_interval, limit_val_batches
        self.log_every_n_steps, self.callbacks, self.seed = log_every_n_steps, list(callbacks or []), seed
        self._hooks = [as_callback(cb, i) for i, cb in enumerate(self.callbacks)]
        self.model: TrainableModel | None = None
        self.enable_progress_bar, self.enable_checkpointing = enable_progress_bar, enable_checkpointing
        self.global_step = 0
        self.run_dir: Path | None = None
        self._stop_requested = False

    # -- setup ---------------------------------------------------------------------------
    def _setup(self, model: TrainableModel, data: DataModule, peft: PeftMethod | None,
               optim: OptimizerModule) -> TrainingSetup:
        if self._strategy_arg in (None, "auto"):
            self.strategy = resolve_strategy(self._strategy_arg)
        torch.manual_seed(self.seed)  # before setup: Megatron derives its model-parallel RNG streams from it
        self.strategy.setup(self.accelerator, self.collective_timeout)
        torch.manual_seed(self.seed)
        if self._precision_arg == AUTO:
            self._choose_precision(peft is not None)
        if self.fit_memory is not None:
            self._fit_memory(model, data, peft)
        model.configure_model(self.strategy.device, dtype=self.weight_dtype)
        if peft is not None:
            model.apply_peft(peft)
        elif self.weight_dtype is not None and self.strategy.rank == 0:
            logger.warning("precision='bf16-true' with full fine-tuning: the weights and AdamW state are bf16, with "
                        "no fp32 master copy (small updates round away); use precision='bf16-mixed' to keep fp32 weights")
        data.setup(model.tokenizer, dp_rank=self.strategy.dp_rank, dp_size=self.strategy.dp_size)
        accum = self._accumulation(data)
        module = self.strategy.wrap(model, mixed_precision=self.autocast_dtype or self.weight_dtype)
        max_steps = self.max_steps
        if max_steps <= 0:
            per_epoch = data.micro_batches_per_epoch // accum
            if per_epoch == 0:
                raise ConfigError(f"the training split has {data.micro_batches_per_epoch} micro-batches per rank, "
                                  f"fewer than one optimizer step ({accum}): use more data or smaller batches")
            max_steps = per_epoch * (self.max_epochs or 0)  # __init__ refuses max_steps <= 0 without epochs
        if self.max_steps <= 0:  # max_steps came from max_epochs: fit checked the schedule against neither
            optim.check(max_steps)
        self._clip = self.gradient_clip_val or optim.clip_grad
        optimizer, scheduler = optim.build((p for p in module.parameters() if p.requires_grad), max_steps)
        return TrainingSetup(module, optimizer, scheduler, accum, max_steps)

    def _choose_precision(self, peft: bool) -> None:
        """``precision="auto"``: decided for the device the strategy set up (``trainer/precision.py``), said once."""
        self.precision, reason = choose_precision(detect(self.strategy.device), peft, self.strategy.cpu_bf16_autocast)
        self.autocast_dtype, self.weight_dtype = PRECISIONS[self.precision]
        if self.strategy.rank == 0:
            print(f"precision auto -> {self.precision} ({reason})", flush=True)

    def _fit_memory(self, model: TrainableModel, data: DataModule, peft: PeftMethod | None) -> None:
        """``fit_memory``: the planner's cheapest changes under the budget, on the set-up strategy and before any
        weight loads (``plan/fit.py`` changes the model and data, and prints each change)."""
        from nemo_automodel.plan.fit import fit_to_budget, parse_fit_memory

        budget = parse_fit_memory(self.fit_memory)
        assert budget is not None  # _setup asks only when fit_memory is set
        fitted = fit_to_budget(budget, model, data, peft, self.strategy,
                               precision=self.precision, precision_auto=self._precision_arg == AUTO,
                               strategy_auto=self._strategy_arg in (None, "auto"),
                               accumulate=self.accumulate_grad_batches)
        self.precision = fitted.precision
        self.autocast_dtype, self.weight_dtype = PRECISIONS[self.precision]
        self.accumulate_grad_batches = fitted.accumulate
        if fitted.strategy is not None:  # the process group is up: the new strategy only joins it
            self.strategy = resolve_strategy(fitted.strategy)
            self.strategy.setup(self.accelerator, self.collective_timeout)

    def _accumulation(self, data: DataModule) -> int:
        from_data = data.accumulate_grad_batches
        if from_data and self.accumulate_grad_batches not in (1, from_data):
            raise ConfigError(f"accumulate_grad_batches={self.accumulate_grad_batches} disagrees with the data "
                              f"module's global/micro batch ({from_data}): set only one of them")
        return from_data or self.accumulate_grad_batches

    # -- loop ----------------------------------------------------------------------------
    def fit(self, model: TrainableModel, data: DataModule, peft: PeftMethod | None = None,
            optim: OptimizerModule | None = None, log: NeMoLogger | None = None,
            resume: AutoResume | None = None) -> Path:
        """Train and return the run directory. Errors in set-up happen before anything is written."""
        optim = optim or default_optimizer()
        if self.max_steps > 0:
            optim.check(self.max_steps)
        log_cfg = log or NeMoLogger()
        self.run_dir = run_dir = log_cfg.run_dir
        ckpt_root = run_dir / "checkpoints"
        check_trackers(log_cfg.trackers, run_dir)  # package missing, server unreachable: one line, nothing loaded
        model.check(peft, self.strategy)  # e.g. a 4-bit base with no peft, a VLM checkpoint: reads config.json only
        if needs_launch(self.devices, self.num_nodes):
            if self.num_nodes > 1:
                raise ConfigError(f"num_nodes={self.num_nodes} needs a launcher on every node: run under torchrun, "
                                  "NeMo-Run (launcher='torchrun') or Slurm")
            return launch_fit(self, self.devices, (model, data, peft, optim, log_cfg, resume), ckpt_root,
                              PREEMPTED_EXIT_CODE)
        if self.devices * self.num_nodes not in (1, env_world_size()):
            logger.info("devices=%d x num_nodes=%d differs from the launcher's WORLD_SIZE=%d; using the launcher's",
                     self.devices, self.num_nodes, env_world_size())
        self.model = model
        built = self._setup(model, data, peft, optim)
        module, optimizer, scheduler, accum, max_steps = (built.module, built.optimizer, built.scheduler,
                                                          built.accumulate, built.max_steps)
        resume_from = resume.find(ckpt_root, self.strategy) if resume is not None else None
        if resume_from is None and (ckpt_root / "last").is_symlink():
            raise ConfigError(f"{run_dir} already holds checkpoints of another run: pass "
                              "resume=AutoResume(resume_if_exists=True) to continue it, or pick another log name/dir")
        start = 0
        if resume_from is not None:
            start = load_checkpoint(resume_from, module=module, optimizer=optimizer, scheduler=scheduler,
                                    data=data, strategy=self.strategy)
            _print0(self, f"resumed from {resume_from} at step {start}")
        params = {**object_params(self, model, peft, data, optim), **(log_cfg.params or {})} if log_cfg.trackers else {}
        metrics = MetricsLogger(run_dir, enabled=self.strategy.rank == 0, tensorboard=log_cfg.tensorboard,
                                resume_step=start, trackers=log_cfg.trackers, params=params)
        every = log_cfg.ckpt.every_n_train_steps
        save = functools.partial(save_checkpoint, ckpt_root, model=model, module=module, optimizer=optimizer,
                                 scheduler=scheduler, data=data, strategy=self.strategy,
                                 keep_last=log_cfg.ckpt.keep_last, resumed_from=start)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        module.train()  # from_pretrained returns eval mode: dropout must be on while training
        for cb in self._hooks:
            cb.on_train_start(self, module)
        batches = data.train_batches()
        bar = tqdm(total=max_steps, initial=start, disable=not (self.enable_progress_bar and self.strategy.rank == 0),
                   desc="train", dynamic_ncols=True)
        step_metrics: dict[str, float] = {}
        tokens, t0 = 0, time.perf_counter()
        try:
            for step in range(start + 1, max_steps + 1):
                self.global_step = step
                micro = [next(batches) for _ in range(accum)]
                loss, n_tokens, n_seen, terms = self._train_step(model, module, optimizer, scheduler, micro)
                tokens += n_seen
                bar.update(1)
                if step % self.log_every_n_steps == 0 or step == max_steps:
                    rate = tokens / max(time.perf_counter() - t0, 1e-9)
                    step_metrics = {"train_loss": loss, **terms, "lr": scheduler.get_last_lr()[0],
                                    "tokens_per_sec": rate, "loss_tokens": n_tokens}
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
                    metrics.log(step, step_metrics)
                    tokens, t0 = 0, time.perf_counter()
                if self._should_validate(step, max_steps, data):
                    val = self.validate(model, module, data)
                    if val is not None:
                        metrics.log(step, {"val_loss": val})
                        step_metrics["val_loss"] = val
                for cb in self._hooks:
                    cb.on_train_step_end(self, step, step_metrics)
                stop = self._sigterm_agreed()
                last = step == max_steps
                if self.enable_checkpointing and (last or stop or (every and step % every == 0)):
                    save(step, metrics=step_metrics, preempted=stop)
                if stop:
                    _print0(self, f"SIGTERM: stopped after step {step} (checkpointed: {self.enable_checkpointing}); "
                                  f"exiting with {PREEMPTED_EXIT_CODE}")
                    raise SystemExit(PREEMPTED_EXIT_CODE)
        except BaseException as err:
            metrics.abort("KILLED" if isinstance(err, (SystemExit, KeyboardInterrupt)) else "FAILED")
            if isinstance(err, RuntimeError) and _timed_out(err):
                raise RunError(f"rank {self.strategy.rank}: a collective got no answer from a peer rank within "
                               f"collective_timeout={self.collective_timeout:g} s at step {self.global_step}: a rank "
                               "is hung (stopped, deadlocked) or gone; Trainer(collective_timeout=...) sets the wait "
                               f"({first_line(err)})") from err
            raise
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, previous)
        metrics.close()
        for cb in self._hooks:
            cb.on_train_end(self)
        return run_dir

    def _train_step(self, model: TrainableModel, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, micro: list[dict[str, torch.Tensor]]) -> tuple[float, int, int, dict[str, float]]:
        """One optimizer step over the micro-batches; the loss (and each of the model's ``loss_terms``) is
        token-weighted over the whole step."""
        device = self.strategy.device
        micro = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro]
        # counted on whole micro-batches: every rank of a replica (tp, cp) reads the same ones
        n_tokens = self.strategy.all_reduce(torch.stack([b["loss_mask"].sum() for b in micro]).sum()
                                            .to(torch.float64)).item()
        if n_tokens == 0:
            raise ConfigError("a training step has no loss tokens (every label is masked): check loss_mask/formatting")
        seen = sum(int(b["num_tokens"].sum()) if "num_tokens" in b else b["input_ids"].numel() for b in micro)
        scale = self.strategy.grad_reduce_size / n_tokens  # DDP/FSDP average gradients over the ranks they reduce
        model.loss_terms()  # what an earlier caller (validation) left
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i, batch in enumerate(micro):
            # DDP: all-reduce gradients only on the last micro-batch (no_sync before it); context parallel:
            # `batch` holds this rank's part of every row inside micro_batch_context
            with self.strategy.grad_sync(module, sync=i == len(micro) - 1), self.strategy.micro_batch_context(batch):
                with self._autocast():
                    loss_sum = model.loss(module, batch)
                (loss_sum * scale).backward()
            total += loss_sum.detach().to(torch.float64)
        if self._clip:
            self.strategy.clip_grad_norm(module, self._clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        terms = model.loss_terms()
        names = sorted(terms)
        parts = [self.strategy.sum_sequence_shards(x.to(device, torch.float64).reshape(()))
                 for x in (total, *(terms[n] for n in names))]
        sums = self.strategy.all_reduce(torch.stack([*parts, torch.tensor(float(seen), dtype=torch.float64,
                                                                          device=device)]))
        return (sums[0].item() / n_tokens, int(n_tokens), int(sums[-1].item()),
                {n: sums[1 + i].item() / n_tokens for i, n in enumerate(names)})

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.strategy.device.type, dtype=self.autocast_dtype)

    # -- validation ----------------------------------------------------------------------
    def _should_validate(self, step: int, max_steps: int, data: DataModule) -> bool:
        if self.limit_val_batches == 0 or not data.has_validation:
            return False
        interval = self.val_check_interval
        if isinstance(interval, float) and 0 < interval <= 1:
            interval = max(1, int(interval * max_steps))
        return step == max_steps or bool(interval and step % int(interval) == 0)

    @torch.no_grad()
    def validate(self, model: TrainableModel, module: torch.nn.Module, data: DataModule) -> float | None:
        """Token-weighted validation loss over (at most ``limit_val_batches``) validation batches."""
        batches = list(data.val_batches() or [])
        limit = self.limit_val_batches
        if isinstance(limit, float) and limit <= 1:
            limit = math.ceil(limit * len(batches))
        batches = batches[: int(limit)] if limit else batches
        module.eval()
        loss, tokens = (torch.zeros(1, dtype=torch.float64, device=self.strategy.device) for _ in range(2))
        for batch in batches:
            batch = {k: v.to(self.strategy.device) for k, v in batch.items()}
            tokens += batch["loss_mask"].sum().double()  # whole rows, before context parallel splits them
            with self._autocast(), self.strategy.micro_batch_context(batch):
                loss += model.loss(module, batch).double()
        module.train()
        total = self.strategy.all_reduce(torch.cat([self.strategy.sum_sequence_shards(loss), tokens])).cpu()
        return float(total[0] / total[1]) if total[1] > 0 else None

    # -- preemption ----------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop_requested = True

    def _sigterm_agreed(self) -> bool:
        """True on every rank once any rank got SIGTERM (so all ranks checkpoint together)."""
        flag = torch.tensor([float(self._stop_requested)], device=self.strategy.device)
        return bool(self.strategy.all_reduce(flag, world=True).item() > 0)


def _refuse_unused_lightning_args(num_sanity_val_steps: int, use_distributed_sampler: bool | None,
                                  logger: Any) -> None:
    """Lightning arguments that change nothing here: say so once instead of dropping them silently."""
    if logger not in (None, False):
        raise bad_value("logger", logger, "trackers go on the run's NeMoLogger: finetune(log=NeMoLogger(wandb="
                        "WandbLogger(...), mlflow=MLflowLogger(...)))")
    if num_sanity_val_steps:
        warnings.warn(f"Trainer(num_sanity_val_steps={num_sanity_val_steps}) is ignored: no sanity validation runs "
                      "before training here", UserWarning, stacklevel=3)
    if use_distributed_sampler is not None:
        warnings.warn(f"Trainer(use_distributed_sampler={use_distributed_sampler}) is ignored: the data module always "
                      "splits batches over the data-parallel ranks with its own resumable sampler",
                      UserWarning, stacklevel=3)


def _print0(trainer: Trainer, msg: str) -> None:
    if trainer.strategy.rank == 0:
        tqdm.write(msg)
