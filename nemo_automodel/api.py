"""`finetune` and `pretrain`: the two entry points a recipe graph calls where the job runs."""

from __future__ import annotations

from pathlib import Path

from nemo_automodel.models.hf_causal_lm import HFAutoModelForCausalLM
from nemo_automodel.trainer import AutoResume, NeMoLogger, Trainer


def finetune(model: HFAutoModelForCausalLM, data, trainer: Trainer, peft=None, optim=None,
             log: NeMoLogger | None = None, resume: AutoResume | None = None) -> Path:
    """Fine-tune ``model`` on ``data``: LoRA when ``peft`` is given, full SFT when it is None.

    Returns the run directory (checkpoints/, metrics.jsonl, tensorboard/, loss.png).
    """
    return trainer.fit(model, data, peft=peft, optim=optim, log=log, resume=resume)


def pretrain(model: HFAutoModelForCausalLM, data, trainer: Trainer, optim=None,
             log: NeMoLogger | None = None, resume: AutoResume | None = None) -> Path:
    """Train all weights (typically ``load_pretrained_weights=False``) with loss on every token."""
    return trainer.fit(model, data, peft=None, optim=optim, log=log, resume=resume)
