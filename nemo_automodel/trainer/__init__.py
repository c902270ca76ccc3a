"""Training: the loop (``trainer.py``), the optimizer module (``optim.py``), ``Trainer(devices=N)``'s own
workers (``spawn.py``) and the ``JitTransform`` callback (``jit.py``).

Strategies, checkpoints and trackers have rooms of their own (``parallel/``, ``checkpoint/``, ``tracking/``);
their old names here still import, with a DeprecationWarning.
"""

from __future__ import annotations

from nemo_automodel.deprecation import moved_names
from nemo_automodel.trainer.trainer import PREEMPTED_EXIT_CODE, NeMoLogger, Trainer

__all__ = ["PREEMPTED_EXIT_CODE", "NeMoLogger", "Trainer"]

__getattr__ = moved_names(__name__, {
    **{n: f"nemo_automodel.checkpoint:{n}" for n in ("AutoResume", "ModelCheckpoint")},
    **{n: f"nemo_automodel.parallel:{n}" for n in ("DDPStrategy", "FSDP2Strategy", "SingleDeviceStrategy")},
    **{n: f"nemo_automodel.tracking:{n}" for n in ("MLflowLogger", "WandbLogger")}})
