"""The ``llm`` namespace of NeMo 25.02 AutoModel scripts: ``from nemo_automodel import llm``."""

from nemo_automodel.data import ChatHFDataModule, HFDatasetDataModule, SquadHFDataModule
from nemo_automodel.llm import adam, api, peft
from nemo_automodel.models import HFAutoModelForCausalLM

__all__ = ["ChatHFDataModule", "HFAutoModelForCausalLM", "HFDatasetDataModule", "SquadHFDataModule",
           "adam", "api", "peft"]
