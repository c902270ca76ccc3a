"""`finetune` and `pretrain`: the two entry points a recipe graph calls where the job runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from nemo_automodel.checkpoint import AutoResume
from nemo_automodel.contracts import DataModule, OptimizerModule, PeftMethod, TrainableModel
from nemo_automodel.errors import ConfigError
from nemo_automodel.trainer import NeMoLogger, Trainer


def finetune(model: TrainableModel, data: DataModule, trainer: Trainer, peft: PeftMethod | None = None,
             optim: OptimizerModule | None = None,
             log: NeMoLogger | None = None, resume: AutoResume | None = None, preflight: bool = False) -> Path:
    """Fine-tune ``model`` on ``data``: LoRA when ``peft`` is given, full SFT when it is None.

    ``preflight=True`` first checks the data with the tokenizer alone (``nemo_automodel.data.preflight``):
    rank 0 prints the summary, and a reply that cannot teach the model to stop fails the run before any
    weights load. Returns the run directory (checkpoints/, metrics.jsonl, tensorboard/, loss.png).
    """
    if preflight:
        run_preflight(model, data, trainer)
    return trainer.fit(model, data, peft=peft, optim=optim, log=log, resume=resume)


def run_preflight(model: TrainableModel, data: DataModule, trainer: Trainer) -> None:
    """The data preflight of a job on every rank (the formatted data is reused by training); rank 0 prints it."""
    from nemo_automodel.data import HFDatasetDataModule
    from nemo_automodel.data.preflight import preflight

    if not isinstance(data, HFDatasetDataModule):
        raise ConfigError(f"preflight=True checks text data modules (HFDatasetDataModule), not {type(data).__name__}: "
                          "set preflight=False (image-text data is checked row by row when the job sets it up)")
    report = preflight(data, model.tokenizer, dp_size=trainer.devices * trainer.num_nodes)
    if int(os.environ.get("RANK", "0")) == 0:
        print(report.render(color=sys.stdout.isatty()), flush=True)
    report.raise_for_problems()


def pretrain(model: TrainableModel, data: DataModule, trainer: Trainer, optim: OptimizerModule | None = None,
             log: NeMoLogger | None = None, resume: AutoResume | None = None) -> Path:
    """Train all weights (typically ``load_pretrained_weights=False``) with loss on every token."""
    return trainer.fit(model, data, peft=None, optim=optim, log=log, resume=resume)
