"""The ``vlm`` namespace of NeMo 25.02 AutoModel VLM scripts: ``from nemo_automodel import vlm``.

``vlm.HFDatasetDataModule`` is the image + text chat data module (``HFImageTextDataModule``).
"""

from nemo_automodel.data import HFImageTextDataModule
from nemo_automodel.data import HFImageTextDataModule as HFDatasetDataModule
from nemo_automodel.llm import adam, api, peft
from nemo_automodel.models import HFAutoModelForImageTextToText

__all__ = ["HFAutoModelForImageTextToText", "HFDatasetDataModule", "HFImageTextDataModule", "adam", "api", "peft"]
