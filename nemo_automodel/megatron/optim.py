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
from nemo_automodel.trainer.optim import PytorchOptimizerModule, WarmupCosineSchedule

TORCH_OPTIMIZERS = {"adam": torch.optim.AdamW, "sgd": torch.optim.SGD}
# torch argument -> OptimizerConfig field, per optimizer (Adam's ``betas`` are adam_beta1/adam_beta2)
TORCH_TO_MEGATRON = {"adam": {"lr": "lr", "weight_decay": "weight_decay", "eps": "adam_eps"},
                     "sgd": {"lr": "lr", "weight_decay": "weight_decay", "momentum": "sgd_momentum"}}
BETAS = ("adam_beta1", "adam_beta2")


def torch_kwargs(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The torch optimizer's arguments for the given OptimizerConfig ``fields`` (only those present)."""
    names = {v: k for k, v in TORCH_TO_MEGATRON[kind].items()}
    kwargs = {names[k]: v for k, v in fields.items() if k in names}
    if kind == "adam" and any(b in fields for b in BETAS):
        kwargs["betas"] = (fields.get("adam_beta1", 0.9), fields.get("adam_beta2", 0.999))
    return kwargs


class MegatronOptimizerModule(PytorchOptimizerModule):
    """Megatron ``OptimizerConfig`` + an optional LR schedule -> ``(optimizer, scheduler)``."""

    def __init__(self, config: Any, lr_scheduler: WarmupCosineSchedule | None = None) -> None:
        if getattr(config, "use_distributed_optimizer", False):
            raise ConfigError("OptimizerConfig(use_distributed_optimizer=True) needs Megatron's DDP on CUDA, which "
                              "this trainer does not drive: set it to False (torch DDP over the data-parallel group)")
        if config.lr is None:
            raise bad_value("OptimizerConfig.lr", None, "set a learning rate")
        kind = config.optimizer
        if kind not in TORCH_OPTIMIZERS:
            raise bad_value("OptimizerConfig.optimizer", kind, "use 'adam' or 'sgd'")
        fields = {f: getattr(config, f) for f in (*TORCH_TO_MEGATRON[kind].values(), *BETAS)}
        fn = functools.partial(TORCH_OPTIMIZERS[kind], **torch_kwargs(kind, fields))
        super().__init__(optimizer_fn=fn, lr_scheduler=lr_scheduler)
        self.config = config
        self.clip_grad = config.clip_grad or None
