"""Optimizer nodes for recipes: each returns a ``run.Config`` of a `PytorchOptimizerModule`.

Use ``fdl.build(pytorch_adam_with_flat_lr(lr=1e-5))`` for an object, or keep the config in a
recipe graph. The optimizer is ``torch.optim.AdamW`` (decoupled weight decay). NeMo-style scripts
reach the same functions as ``nemo_automodel.llm.adam.*``.
"""

from __future__ import annotations

import nemo_run as run
import torch

from nemo_automodel.trainer.optim import PytorchOptimizerModule, WarmupCosineSchedule


def _adamw(lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> run.Partial:
    return run.Partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def pytorch_adam_with_flat_lr(lr: float = 1e-5, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                              eps: float = 1e-8) -> run.Config[PytorchOptimizerModule]:
    """AdamW at a constant learning rate."""
    return run.Config(PytorchOptimizerModule, optimizer_fn=_adamw(lr, weight_decay, betas, eps))


def pytorch_adam_with_cosine_annealing(max_lr: float = 1e-5, warmup_steps: int = 0, constant_steps: int = 0,
                                       min_lr: float | None = None, weight_decay: float = 0.01,
                                       betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                                       max_steps: int | None = None) -> run.Config[PytorchOptimizerModule]:
    """AdamW with linear warmup and cosine decay to ``min_lr`` (default max_lr / 10)."""
    schedule = run.Config(WarmupCosineSchedule, warmup_steps=warmup_steps, constant_steps=constant_steps,
                          min_lr=max_lr / 10 if min_lr is None else min_lr, max_steps=max_steps)
    return run.Config(PytorchOptimizerModule, optimizer_fn=_adamw(max_lr, weight_decay, betas, eps),
                      lr_scheduler=schedule)
