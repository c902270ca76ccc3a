"""``llm.api``: finetune, pretrain and export."""

from nemo_automodel.api import finetune, pretrain
from nemo_automodel.export import export

__all__ = ["export", "finetune", "pretrain"]
