"""`MegatronOptimizerModule`: NeMo's optimizer node for the Megatron path, on Megatron's `OptimizerConfig`.

The configuration is megatron-core's own ``OptimizerConfig`` dataclass (``optimizer``, ``lr``,
``weight_decay``, ``adam_beta1/2``, ``adam_eps``, ``sgd_momentum``). With TP + torch DDP every
rank holds whole (slices of) parameters, so the update is torch's AdamW/SGD on them, which is
what megatron-core itself falls back to without Apex/Transformer Engine. Megatron's distributed
optimizer (``use_distributed_optimizer=True``) needs Megatron's DDP and CUDA: refused here.
Gradient clipping is the trainer's ``gradient_clip_val`` (TP-aware in `MegatronStrategy`);
``clip_grad`` is used when the trainer sets none.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from nemo_automodel.errors import ConfigError, bad_value
from nemo_automodel.optim import OptimizerModule, WarmupCosineSchedule


class MegatronOptimizerModule(OptimizerModule):
    """Megatron ``OptimizerConfig`` + an optional LR schedule -> ``(optimizer, scheduler)``."""

    def __init__(self, config: Any, lr_scheduler: WarmupCosineSchedule | None = None) -> None:
        if getattr(config, "use_distributed_optimizer", False):
            raise ConfigError("OptimizerConfig(use_distributed_optimizer=True) needs Megatron's DDP on CUDA, which "
                              "this trainer does not drive: set it to False (torch DDP over the data-parallel group)")
        if config.lr is None:
            raise bad_value("OptimizerConfig.lr", None, "set a learning rate")
        if config.optimizer == "adam":
            fn = functools.partial(torch.optim.AdamW, lr=config.lr, weight_decay=config.weight_decay,
                                   betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
        elif config.optimizer == "sgd":
            fn = functools.partial(torch.optim.SGD, lr=config.lr, weight_decay=config.weight_decay,
                                   momentum=config.sgd_momentum)
        else:
            raise bad_value("OptimizerConfig.optimizer", config.optimizer, "use 'adam' or 'sgd'")
        super().__init__(optimizer_fn=fn, lr_scheduler=lr_scheduler)
        self.config = config

    @property
    def clip_grad(self) -> float | None:
        return self.config.clip_grad or None
