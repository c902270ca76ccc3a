"""``HFImageTextDataModule``: chat rows with images for vision-language fine-tuning (``contracts.DataModule``).

The constructor only records and checks its arguments. ``setup(processor, dp_rank, dp_size)`` loads the
split (same sources as the text module: a ``datasets.Dataset``, local JSONL/JSON/parquet files, a
``save_to_disk`` folder or a Hub name) and reads every row once, images included, so a row that cannot
train (no image for an image part, a missing or unreadable file, a template that fails) stops the run
before anything is written. Micro-batches are encoded on demand by the processor (``image_chat.py``);
the order is the text module's deterministic, resumable, data-parallel sampler.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_automodel.data.image_chat import ImageChatEncoder, split_row
from nemo_automodel.data.loading import check_local_source, load_split, open_local, parse_split
from nemo_automodel.data.sampler import (
    MicroBatchSampler,
    accumulation,
    check_rank,
    parse_position,
    rank_batches,
)
from nemo_automodel.errors import ConfigError, bad_value, check_int

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]


def _default_root(source: Any) -> Path | None:
    """Relative image paths in a local data file resolve against the file's folder."""
    first = source[0] if isinstance(source, (list, tuple)) and source else source
    if isinstance(first, (str, os.PathLike)) and Path(first).expanduser().is_file():
        return Path(first).expanduser().resolve().parent
    if isinstance(first, (str, os.PathLike)) and Path(first).expanduser().is_dir():
        return Path(first).expanduser().resolve()
    return None


class HFImageTextDataModule:
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
        **load_kwargs: passed to ``datasets.load_dataset``.
    """

    def __init__(self, path_or_dataset: Any, split: str = "train", val_split: str | None = None,
                 seq_length: int = 2048, micro_batch_size: int = 1, global_batch_size: int | None = None,
                 messages_column: str = "messages", images_column: str = "images",
                 image_root: str | os.PathLike | None = None, packed_sequence_size: int = 0,
                 shuffle: bool = True, seed: int = 1234, limit_samples: int | None = None, **load_kwargs: Any):
        check_int("seq_length", seq_length, 2)
        check_int("micro_batch_size", micro_batch_size, 1)
        check_int("global_batch_size", global_batch_size, 1, allow_none=True)
        check_int("seed", seed, 0)
        check_int("limit_samples", limit_samples, 1, allow_none=True)
        check_int("packed_sequence_size", packed_sequence_size, 0)
        if packed_sequence_size:
            raise bad_value("packed_sequence_size", packed_sequence_size,
                            "use 0: packing is not supported for image-text rows (image features and the model's "
                            "multimodal position ids cannot be split across packed samples); batches are padded")
        if global_batch_size is not None and global_batch_size % micro_batch_size:
            raise bad_value("global_batch_size", global_batch_size, f"a multiple of micro_batch_size={micro_batch_size}")
        parse_split(split, "split")
        if val_split is not None:
            parse_split(val_split, "val_split")
        check_local_source(path_or_dataset)
        self.path_or_dataset, self.split, self.val_split = path_or_dataset, split, val_split
        self.seq_length, self.micro_batch_size, self.global_batch_size = seq_length, micro_batch_size, global_batch_size
        self.messages_column, self.images_column = messages_column, images_column
        self.image_root = Path(image_root).expanduser() if image_root is not None else None
        self._root = self.image_root  # decided in setup: the data file's folder by default
        self.packed_sequence_size = 0
        self.shuffle, self.seed, self.limit_samples, self.load_kwargs = shuffle, seed, limit_samples, load_kwargs
        self._train = self._val = None
        self._encoder: ImageChatEncoder | None = None
        self._sampler: MicroBatchSampler | None = None
        self._state = {"epoch": 0, "batch_in_epoch": 0}
        self._dp_rank, self._dp_size = 0, 1
        self._processor_id: int | None = None

    # ---- setup -----------------------------------------------------------------------------
    def setup(self, tokenizer: Any, dp_rank: int = 0, dp_size: int = 1) -> None:
        """Load and check every row; build this rank's sampler. ``tokenizer`` is the model's processor."""
        check_rank(dp_rank, dp_size)
        self._dp_rank, self._dp_size = dp_rank, dp_size
        _ = self.accumulate_grad_batches
        if getattr(tokenizer, "image_processor", None) is None:
            raise ConfigError(f"HFImageTextDataModule needs a processor with an image processor, got "
                              f"{type(tokenizer).__name__}: pair it with llm.HFAutoModelForImageTextToText")
        if self._processor_id != id(tokenizer):
            self._encoder = ImageChatEncoder(tokenizer, self.seq_length)
            self._root = self.image_root or _default_root(self.path_or_dataset)
            splits = open_local(self.path_or_dataset, self.load_kwargs)
            self._train = self._prepare(splits, self.split, "split", self.limit_samples)
            self._val = self._prepare(splits, self.val_split, "val_split", None) if self.val_split else None
            self._processor_id = id(tokenizer)
        if self._sampler is not None:
            self._state = self._sampler.state_dict()
        self._sampler = MicroBatchSampler(len(self._train), self.micro_batch_size, dp_rank, dp_size,
                                          self.shuffle, self.seed)
        self._sampler.load_state_dict(self._state)

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
            self._encoder.render(messages, False, i)
        return ds

    def _row(self, ds: Any, i: int) -> tuple[list[dict], list[Any]]:
        return split_row(ds[int(i)], int(i), self.messages_column, self.images_column, self._root)

    # ---- properties ------------------------------------------------------------------------
    def _require_setup(self) -> None:
        if self._train is None:
            raise RuntimeError("HFImageTextDataModule.setup(processor, dp_rank, dp_size) must run first")

    @property
    def accumulate_grad_batches(self) -> int | None:
        """Micro-batches per optimizer step on each rank (None without ``global_batch_size``)."""
        return accumulation(self.global_batch_size, self.micro_batch_size, self._dp_size)

    @property
    def has_validation(self) -> bool:
        return self.val_split is not None

    @property
    def micro_batches_per_epoch(self) -> int:
        self._require_setup()
        return self._sampler.batches_per_epoch

    @property
    def train_dataset(self) -> Any:
        """The training split (a ``datasets.Dataset``; rows are encoded per micro-batch)."""
        self._require_setup()
        return self._train

    # ---- batches ---------------------------------------------------------------------------
    def collate(self, ds: Any, indices: np.ndarray) -> Batch:
        """Encode rows ``indices`` of ``ds`` into one micro-batch."""
        rows = [self._row(ds, i) for i in indices]
        return self._encoder.batch(rows, [int(i) for i in indices])

    def train_batches(self) -> Iterator[Batch]:
        self._require_setup()
        for indices in self._sampler:
            yield self.collate(self._train, indices)

    def val_batches(self) -> list[Batch] | None:
        self._require_setup()
        if self._val is None:
            return None
        batches = rank_batches(np.arange(len(self._val)), self.micro_batch_size, self._dp_rank, self._dp_size,
                               drop_last=self._dp_size > 1)
        return [self.collate(self._val, b) for b in batches]

    # ---- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return self._sampler.state_dict() if self._sampler is not None else dict(self._state)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if self._sampler is not None:
            self._sampler.load_state_dict(state)
        else:
            self._state = parse_position(state)
