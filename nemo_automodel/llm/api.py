"""``llm.api``: finetune and pretrain."""

from nemo_automodel.api import finetune, pretrain

__all__ = ["finetune", "pretrain"]
