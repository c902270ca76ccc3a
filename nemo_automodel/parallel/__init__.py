"""Parallelism on the AutoModel path: strategies (single device, DDP, FSDP2 with TP, CP and EP), the device mesh,
tensor, context and expert parallel. The model says what to shard (``contracts.TrainableModel``); nothing
here imports ``models/``."""

from nemo_automodel.parallel.strategy import (
    DDPStrategy,
    FSDP2Strategy,
    ProcessGroupStrategy,
    SingleDeviceStrategy,
    resolve_strategy,
)

__all__ = ["DDPStrategy", "FSDP2Strategy", "ProcessGroupStrategy", "SingleDeviceStrategy", "resolve_strategy"]
