"""Data layer: load any ``datasets`` source, format it (SQuAD, chat, text or pre-tokenized),
pack it, and serve deterministic, resumable, data-parallel micro-batches; image + text chats for
vision-language models (``image_datamodule.py``, encoded per micro-batch by the model's processor).
Both data modules derive from ``base.SampledDataModule`` (shared arguments, sampler, batches, position).

Batches are dicts of CPU tensors right-padded to the longest row: ``input_ids``, ``labels``
(already shifted), ``loss_mask`` (float32) and ``position_ids`` (restarting per packed sample).
"""

from nemo_automodel.data.collate import BATCH_KEYS, collate
from nemo_automodel.data.datamodule import ChatHFDataModule, HFDatasetDataModule, SquadHFDataModule
from nemo_automodel.data.formatting import FORMATTINGS, chat_tokens
from nemo_automodel.data.image_datamodule import HFImageTextDataModule
from nemo_automodel.data.loading import SPLIT_ALIASES
from nemo_automodel.data.packing import first_fit_decreasing, pack_sequences, packed_position_ids
from nemo_automodel.data.preflight import PreflightReport, preflight
from nemo_automodel.data.rows import Rows, SampleStore
from nemo_automodel.data.sampler import MicroBatchSampler, epoch_order, rank_batches

__all__ = [
    "BATCH_KEYS",
    "FORMATTINGS",
    "SPLIT_ALIASES",
    "ChatHFDataModule",
    "HFDatasetDataModule",
    "HFImageTextDataModule",
    "MicroBatchSampler",
    "PreflightReport",
    "Rows",
    "SampleStore",
    "SquadHFDataModule",
    "chat_tokens",
    "collate",
    "epoch_order",
    "first_fit_decreasing",
    "pack_sequences",
    "packed_position_ids",
    "preflight",
    "rank_batches",
]
