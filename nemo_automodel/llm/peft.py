"""``llm.peft``: LoRA and the merge helper."""

from nemo_automodel.peft import LoRA, merge_adapter

__all__ = ["LoRA", "merge_adapter"]
