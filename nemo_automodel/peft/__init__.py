"""Parameter-efficient fine-tuning: LoRA (DoRA, rsLoRA) on top of the `peft` library."""

from nemo_automodel.peft.lora import DoRA, LoRA, merge_adapter
from nemo_automodel.peft.targets import resolve_target_modules

__all__ = ["DoRA", "LoRA", "merge_adapter", "resolve_target_modules"]
