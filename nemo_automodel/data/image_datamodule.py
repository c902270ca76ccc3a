"""``HFImageTextDataModule``: chat rows with images for vision-language fine-tuning (``contracts.DataModule``).

The constructor only records and checks its arguments. ``setup(processor, dp_rank, dp_size)`` loads the
split (same sources as the text module: a ``datasets.Dataset``, local JSONL/JSON/parquet files, a
``save_to_disk`` folder or a Hub name) and reads every row once, images included, so a row that cannot
train (no image for an image part, a missing or unreadable file, a template that fails) stops the run
before anything is written. Micro-batches are encoded on demand by the processor (``image_chat.py``);
the order is the text module's deterministic, resumable, data-parallel sampler.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from nemo_automodel.data.base import Batch, SampledDataModule
from nemo_automodel.data.image_chat import ImageChatEncoder, split_row
from nemo_automodel.data.loading import load_split, open_local
from nemo_automodel.errors import ConfigError, bad_value


def _default_root(source: Any) -> Path | None:
    """Relative image paths in a local data file resolve against the file's folder."""
    first = source[0] if isinstance(source, (list, tuple)) and source else source
    if isinstance(first, (str, os.PathLike)) and Path(first).expanduser().is_file():
        return Path(first).expanduser().resolve().parent
    if isinstance(first, (str, os.PathLike)) and Path(first).expanduser().is_dir():
        return Path(first).expanduser().resolve()
    return None


class HFImageTextDataModule(SampledDataModule):
    """Micro-batches of image + text chats for ``HFAutoModelForImageTextToText``.

    Args:
        path_or_dataset: ``Dataset``/``DatasetDict``, local file(s), a ``{split: files}`` dict, a
            ``save_to_disk`` folder, or a Hub dataset name.
        split / val_split: split names (aliases and slices as in ``HFDatasetDataModule``).
        seq_length: max positions per row after shifting; longer rows are cut (with a warning), and a
            cut that would drop image tokens is an error.
        micro_batch_size / global_batch_size: rows per micro-batch / per optimizer step.
        messages_column / images_column: the chat column and the optional column of images that fill
            ``{"type": "image"}`` parts without an image of their own.
        image_root: folder that relative image paths resolve against (default: the data file's folder).
        packed_sequence_size: must stay 0: packing image rows is refused (the image features and the
            families' position ids, e.g. Qwen2-VL's 3-D rope, do not carry over to packed rows).
        shuffle / seed / limit_samples: as in ``HFDatasetDataModule``.
        **load_kwargs: passed to ``datasets.load_dataset`` (NeMo's DataLoader knobs, e.g. ``num_workers``,
            are dropped).
    """

    setup_arg = "processor"

    def __init__(self, path_or_dataset: Any, split: str = "train", val_split: str | None = None,
                 seq_length: int = 2048, micro_batch_size: int = 1, global_batch_size: int | None = None,
                 messages_column: str = "messages", images_column: str = "images",
                 image_root: str | os.PathLike | None = None, packed_sequence_size: int = 0,
                 shuffle: bool = True, seed: int = 1234, limit_samples: int | None = None, **load_kwargs: Any):
        if packed_sequence_size:
            raise bad_value("packed_sequence_size", packed_sequence_size,
                            "use 0: packing is not supported for image-text rows (image features and the model's "
                            "multimodal position ids cannot be split across packed samples); batches are padded")
        super().__init__(path_or_dataset, split, val_split, seq_length, micro_batch_size, global_batch_size,
                         0, shuffle, seed, limit_samples, **load_kwargs)
        self.messages_column, self.images_column = messages_column, images_column
        self.image_root = Path(image_root).expanduser() if image_root is not None else None
        self._root = self.image_root  # decided in setup: the data file's folder by default
        self._encoder: ImageChatEncoder | None = None

    # ---- setup -----------------------------------------------------------------------------
    def _setup_key(self, tokenizer: Any) -> tuple:
        return super()._setup_key(tokenizer) + (self.messages_column, self.images_column, self.image_root)

    def _load(self, tokenizer: Any) -> tuple[Any, Any]:
        """Load both splits and check every row (``tokenizer`` is the model's processor)."""
        if getattr(tokenizer, "image_processor", None) is None:
            raise ConfigError(f"HFImageTextDataModule needs a processor with an image processor, got "
                              f"{type(tokenizer).__name__}: pair it with llm.HFAutoModelForImageTextToText")
        self._encoder = ImageChatEncoder(tokenizer, self.seq_length)
        self._root = self.image_root or _default_root(self.path_or_dataset)
        splits = open_local(self.path_or_dataset, self.load_kwargs)
        train = self._prepare(splits, self.split, "split", self.limit_samples)
        return train, self._prepare(splits, self.val_split, "val_split", None) if self.val_split else None

    def _prepare(self, splits: Any, split: str, field: str, limit: int | None) -> Any:
        ds = load_split(self.path_or_dataset, splits, split, field, self.load_kwargs)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        if len(ds) == 0:
            raise ConfigError(f"{field}={split!r} has no rows: pick a non-empty split or slice")
        if self.messages_column not in ds.column_names:
            raise ConfigError(f"HFImageTextDataModule needs a {self.messages_column!r} column but split {split!r} has "
                              f"{ds.column_names}: rename it or set messages_column=")
        for i in range(len(ds)):  # every row renders and every image opens, before any weights train
            messages, _ = self._row(ds, i)
            self._ready_encoder().render(messages, False, i)
        return ds

    def _row(self, ds: Any, i: int) -> tuple[list[dict], list[Any]]:
        return split_row(ds[int(i)], int(i), self.messages_column, self.images_column, self._root)

    def _collate(self, ds: Any, indices: np.ndarray) -> Batch:
        """Encode rows ``indices`` of ``ds`` (a ``datasets.Dataset``) into one micro-batch."""
        rows = [self._row(ds, i) for i in indices]
        return self._ready_encoder().batch(rows, [int(i) for i in indices])

    def _ready_encoder(self) -> ImageChatEncoder:
        """The processor's encoder (made by ``setup``)."""
        if self._encoder is None:
            raise self._setup_first()
        return self._encoder
