"""The Megatron-Core backend: GPT model from HF weights, strategy, optimizer module, LoRA, export.

Needs the ``megatron`` extra (``megatron-core``); nothing here imports it until a job builds.
"""

from nemo_automodel.megatron.config import (
    GPTConfig,
    Llama32Config1B,
    Llama32Config3B,
    MistralConfig7B,
    Qwen25Config500M,
    gpt_config_from_hf,
)
from nemo_automodel.megatron.model import LlamaModel, MegatronGPTModel, MistralModel, Qwen2Model
from nemo_automodel.megatron.optim import MegatronOptimizerModule
from nemo_automodel.megatron.strategy import MegatronStrategy

__all__ = ["GPTConfig", "Llama32Config1B", "Llama32Config3B", "LlamaModel", "MegatronGPTModel",
           "MegatronOptimizerModule", "MegatronStrategy", "MistralConfig7B", "MistralModel", "Qwen25Config500M",
           "Qwen2Model", "gpt_config_from_hf"]
