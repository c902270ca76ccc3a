"""Optimizer modules: an optimizer factory plus an LR schedule, built once the params exist.

`PytorchOptimizerModule` (NeMo 2's name) implements ``contracts.OptimizerModule``; its old name here,
``OptimizerModule``, still imports, with a DeprecationWarning.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from nemo_automodel.deprecation import moved_names
from nemo_automodel.errors import bad_value, check_int


def check_optimizer_args(args: Mapping[str, Any]) -> None:
    """Refuse, before anything loads, the values torch would only reject once the model is built."""
    lr, betas, eps, wd, momentum = (args.get(k) for k in ("lr", "betas", "eps", "weight_decay", "momentum"))
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise bad_value("lr", lr, "use a learning rate > 0")
    if betas is not None and (len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise bad_value("betas", betas, "use two values in [0, 1), e.g. (0.9, 0.999)")
    if eps is not None and not (isinstance(eps, (int, float)) and eps > 0):
        raise bad_value("eps", eps, "use a value > 0, e.g. 1e-8")
    if wd is not None and not (isinstance(wd, (int, float)) and wd >= 0):
        raise bad_value("weight_decay", wd, "use a value >= 0")
    if momentum is not None and not (isinstance(momentum, (int, float)) and momentum >= 0):
        raise bad_value("momentum", momentum, "use a value >= 0")


class WarmupCosineSchedule:
    """Linear warmup to the optimizer's LR, optional constant phase, cosine decay to ``min_lr``.

    ``max_steps=None`` takes the trainer's max_steps.
    """

    def __init__(self, warmup_steps: int = 0, constant_steps: int = 0, min_lr: float = 0.0,
                 max_steps: int | None = None) -> None:
        check_int("warmup_steps", warmup_steps, 0)
        check_int("constant_steps", constant_steps, 0)
        check_int("max_steps", max_steps, allow_none=True)
        if min_lr < 0:
            raise bad_value("min_lr", min_lr, "use a value >= 0")
        self.warmup_steps, self.constant_steps = warmup_steps, constant_steps
        self.min_lr, self.max_steps = min_lr, max_steps
        if max_steps is not None:
            self.check(max_steps)

    def check(self, max_steps: int) -> None:
        """Refuse a warmup longer than the run (``self.max_steps`` or the trainer's ``max_steps``)."""
        total = self.max_steps or max_steps
        if self.warmup_steps > total:
            raise bad_value("warmup_steps", self.warmup_steps,
                            f"the run has only {total} steps: use warmup_steps <= {total} or train longer")

    def build(self, optimizer: torch.optim.Optimizer, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        total = self.max_steps or max_steps
        base = optimizer.param_groups[0]["lr"]
        floor = self.min_lr / base if base else 0.0
        decay_start = self.warmup_steps + self.constant_steps

        def factor(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            if step < decay_start or total <= decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start) / (total - decay_start))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class PytorchOptimizerModule:
    """An optimizer factory (e.g. ``functools.partial(torch.optim.AdamW, lr=1e-4)``) and a schedule.

    ``build(params, max_steps)`` returns ``(optimizer, scheduler)``; with no schedule the LR is flat.
    ``clip_grad`` is None here: clipping is the trainer's ``gradient_clip_val``.
    """

    clip_grad: float | None = None

    def __init__(self, optimizer_fn: Callable[..., torch.optim.Optimizer],
                 lr_scheduler: WarmupCosineSchedule | None = None) -> None:
        if isinstance(optimizer_fn, functools.partial):
            check_optimizer_args(optimizer_fn.keywords)
        self.optimizer_fn = optimizer_fn
        self.lr_scheduler = lr_scheduler

    def check(self, max_steps: int) -> None:
        """Refuse a schedule that does not fit a run of ``max_steps`` (called before anything loads)."""
        if self.lr_scheduler is not None:
            self.lr_scheduler.check(max_steps)

    def build(self, params: Iterable[torch.nn.Parameter],
              max_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """``(optimizer, scheduler)`` over ``params``: a flat LR without ``lr_scheduler``."""
        params = list(params)
        if not params:
            raise bad_value("params", [], "the model has no trainable parameters (check peft/target_modules)")
        optimizer = self.optimizer_fn(params)
        if self.lr_scheduler is None:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        else:
            scheduler = self.lr_scheduler.build(optimizer, max_steps)
        return optimizer, scheduler


def default_optimizer() -> PytorchOptimizerModule:
    """The trainer's optimizer when none is given: AdamW at a flat 1e-5, no weight decay
    (``llm.adam.pytorch_adam_with_flat_lr()``'s defaults)."""
    return PytorchOptimizerModule(functools.partial(torch.optim.AdamW, lr=1e-5, weight_decay=0.0))


__getattr__ = moved_names(__name__, {"OptimizerModule": "nemo_automodel.trainer.optim:PytorchOptimizerModule"})
