"""Trainer callbacks (``trainer``: the ``Trainer`` calling; typed Any, as the loop imports this module):
``Callback``, a no-op implementation of ``contracts.TrainerCallback`` to derive from, and
``as_callback``, which lets an object define only the hooks it needs (Lightning-style) while the loop calls
every hook of a ``TrainerCallback``."""

from __future__ import annotations

from typing import Any

import torch

from nemo_automodel.contracts import TrainerCallback
from nemo_automodel.errors import ConfigError

HOOKS = ("on_train_start", "on_train_step_end", "on_train_end")


class Callback:
    """Every hook, doing nothing; override the ones you need."""

    def on_train_start(self, trainer: Any, module: torch.nn.Module) -> None:
        """After set-up (adapters added, ``module`` wrapped), before the first step."""

    def on_train_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        """After optimizer step ``step``; ``metrics``: the last logged values."""

    def on_train_end(self, trainer: Any) -> None:
        """After the last step and checkpoint."""


class _SomeHooks(Callback):
    """An object that defines some of the hooks, with the others as no-ops."""

    def __init__(self, inner: Any, hooks: list[str]) -> None:
        self.inner = inner
        for hook in hooks:
            setattr(self, hook, getattr(inner, hook))


def as_callback(obj: Any, index: int = 0) -> TrainerCallback:
    """``obj`` as a full ``TrainerCallback``; one-line ConfigError for an object that defines none of the hooks
    (a typo such as ``on_train_step_ends`` would otherwise never run)."""
    if isinstance(obj, Callback):
        return obj
    hooks = [h for h in HOOKS if callable(getattr(obj, h, None))]
    if not hooks:
        raise ConfigError(f"callbacks[{index}]: {type(obj).__name__} defines none of the hooks "
                          f"{', '.join(HOOKS)}; derive from nemo_automodel.trainer.callbacks.Callback")
    return _SomeHooks(obj, hooks)
