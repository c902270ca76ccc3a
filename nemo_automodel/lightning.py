"""The ``nl`` namespace of NeMo scripts: ``from nemo_automodel import lightning as nl``."""

from nemo_automodel.megatron.optim import MegatronOptimizerModule
from nemo_automodel.megatron.strategy import MegatronStrategy
from nemo_automodel.trainer import (
    PREEMPTED_EXIT_CODE,
    AutoResume,
    DDPStrategy,
    FSDP2Strategy,
    MLflowLogger,
    ModelCheckpoint,
    NeMoLogger,
    SingleDeviceStrategy,
    Trainer,
    WandbLogger,
)

__all__ = ["PREEMPTED_EXIT_CODE", "AutoResume", "DDPStrategy", "FSDP2Strategy", "MLflowLogger",
           "MegatronOptimizerModule", "MegatronStrategy", "ModelCheckpoint", "NeMoLogger", "SingleDeviceStrategy",
           "Trainer", "WandbLogger"]
