"""The ``llm`` namespace of NeMo 25.02 AutoModel scripts: ``from nemo_automodel import llm``."""

from nemo_automodel.data import (
    ChatHFDataModule,
    HFDatasetDataModule,
    HFImageTextDataModule,
    SquadHFDataModule,
)
from nemo_automodel.llm import adam, api, peft
from nemo_automodel.megatron import (
    GPTConfig,
    Llama32Config1B,
    Llama32Config3B,
    LlamaModel,
    MistralConfig7B,
    MistralModel,
    Qwen2Model,
    Qwen25Config500M,
)
from nemo_automodel.models import HFAutoModelForCausalLM, HFAutoModelForImageTextToText

__all__ = ["ChatHFDataModule", "GPTConfig", "HFAutoModelForCausalLM", "HFAutoModelForImageTextToText",
           "HFDatasetDataModule", "HFImageTextDataModule", "Llama32Config1B",
           "Llama32Config3B", "LlamaModel", "MistralConfig7B", "MistralModel", "Qwen25Config500M", "Qwen2Model",
           "SquadHFDataModule", "adam", "api", "peft"]
