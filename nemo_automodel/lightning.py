"""The ``nl`` namespace of NeMo scripts: ``from nemo_automodel import lightning as nl``."""

from nemo_automodel.checkpoint import AutoResume, ModelCheckpoint
from nemo_automodel.megatron.optim import MegatronOptimizerModule
from nemo_automodel.megatron.strategy import MegatronStrategy
from nemo_automodel.parallel import DDPStrategy, FSDP2Strategy, SingleDeviceStrategy
from nemo_automodel.tracking import MLflowLogger, WandbLogger
from nemo_automodel.trainer import PREEMPTED_EXIT_CODE, NeMoLogger, Trainer
from nemo_automodel.trainer.callbacks import Callback

__all__ = ["PREEMPTED_EXIT_CODE", "AutoResume", "Callback", "DDPStrategy", "FSDP2Strategy", "MLflowLogger",
           "MegatronOptimizerModule", "MegatronStrategy", "ModelCheckpoint", "NeMoLogger", "SingleDeviceStrategy",
           "Trainer", "WandbLogger"]
