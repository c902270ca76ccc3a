"""``llm.peft``: LoRA, DoRA and the merge helper."""

from nemo_automodel.peft import DoRA, LoRA, merge_adapter

__all__ = ["DoRA", "LoRA", "merge_adapter"]
