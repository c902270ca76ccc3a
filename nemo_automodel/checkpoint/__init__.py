"""Crash-safe, self-verifying DCP checkpoints: when to save and what to resume (``save_load.py``), and the
size + SHA-256 record every checkpoint carries (``checksums.py``)."""

from nemo_automodel.checkpoint.save_load import (
    AutoResume,
    ModelCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["AutoResume", "ModelCheckpoint", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
