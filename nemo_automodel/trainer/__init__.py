"""Training: the loop, parallel strategies, checkpoints, metrics and experiment trackers."""

from nemo_automodel.trainer.checkpoint import AutoResume, ModelCheckpoint
from nemo_automodel.trainer.strategy import DDPStrategy, FSDP2Strategy, SingleDeviceStrategy
from nemo_automodel.trainer.trackers import MLflowLogger, WandbLogger
from nemo_automodel.trainer.trainer import PREEMPTED_EXIT_CODE, NeMoLogger, Trainer

__all__ = ["AutoResume", "DDPStrategy", "FSDP2Strategy", "MLflowLogger", "ModelCheckpoint", "NeMoLogger",
           "PREEMPTED_EXIT_CODE", "SingleDeviceStrategy", "Trainer", "WandbLogger"]
