"""Training: the loop (``trainer.py``), the optimizer module (``optim.py``), ``Trainer(devices=N)``'s own
workers (``spawn.py``) and the ``JitTransform`` callback (``jit.py``).

Strategies, checkpoints and trackers have rooms of their own (``parallel/``, ``checkpoint/``, ``tracking/``);
their old names here still import, with a DeprecationWarning.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from nemo_automodel.trainer.trainer import PREEMPTED_EXIT_CODE, NeMoLogger, Trainer

_MOVED = {"AutoResume": "nemo_automodel.checkpoint", "ModelCheckpoint": "nemo_automodel.checkpoint",
          "DDPStrategy": "nemo_automodel.parallel", "FSDP2Strategy": "nemo_automodel.parallel",
          "SingleDeviceStrategy": "nemo_automodel.parallel", "MLflowLogger": "nemo_automodel.tracking",
          "WandbLogger": "nemo_automodel.tracking"}

__all__ = ["PREEMPTED_EXIT_CODE", "NeMoLogger", "Trainer"]


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"nemo_automodel.trainer.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)
