"""``SampledDataModule``: what the text and image-text data modules share (``contracts.DataModule``).

The shared constructor arguments and their checks, the cached ``setup`` with this rank's deterministic,
resumable sampler (``sampler.py``), ``train_batches``/``val_batches``, gradient accumulation and the data
position (``state_dict``/``load_state_dict``). A subclass loads its splits (``_load``), says what they
depend on (``_setup_key``) and turns row indices into a micro-batch (``_collate``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from nemo_automodel.data.loading import check_local_source, parse_split
from nemo_automodel.data.sampler import (
    MicroBatchSampler,
    accumulation,
    check_rank,
    parse_position,
    rank_batches,
)
from nemo_automodel.errors import bad_value, check_int

logger = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]
# NeMo's data modules take these DataLoader knobs; batches are built in-process here, so they are dropped.
NEMO_LOADER_KWARGS = ("num_workers", "pin_memory", "persistent_workers", "use_mcore_sampler",
                      "mcore_dataloader_type")


class SampledDataModule:
    """Base of the data modules: arguments as in ``HFDatasetDataModule`` (``**load_kwargs`` go to
    ``datasets.load_dataset``, NeMo's DataLoader knobs dropped). ``setup_arg`` names what ``setup`` takes."""

    setup_arg = "tokenizer"

    def __init__(self, path_or_dataset: Any, split: str = "train", val_split: str | None = None,
                 seq_length: int = 2048, micro_batch_size: int = 1, global_batch_size: int | None = None,
                 packed_sequence_size: int = 0, shuffle: bool = True, seed: int = 1234,
                 limit_samples: int | None = None, **load_kwargs: Any):
        check_int("seq_length", seq_length, 2)
        check_int("micro_batch_size", micro_batch_size, 1)
        check_int("global_batch_size", global_batch_size, 1, allow_none=True)
        check_int("packed_sequence_size", packed_sequence_size, 0)
        check_int("seed", seed, 0)
        check_int("limit_samples", limit_samples, 1, allow_none=True)
        if global_batch_size is not None and global_batch_size % micro_batch_size:
            raise bad_value("global_batch_size", global_batch_size,
                            f"a multiple of micro_batch_size={micro_batch_size}")
        parse_split(split, "split")
        if val_split is not None:
            parse_split(val_split, "val_split")
        check_local_source(path_or_dataset)
        for key in NEMO_LOADER_KWARGS:
            load_kwargs.pop(key, None)
        self.path_or_dataset, self.split, self.val_split = path_or_dataset, split, val_split
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.global_batch_size, self.packed_sequence_size = global_batch_size, packed_sequence_size
        self.shuffle, self.seed, self.limit_samples, self.load_kwargs = shuffle, seed, limit_samples, load_kwargs
        self._cache_key: tuple | None = None
        self._train: Any = None
        self._val: Any = None
        self._sampler: MicroBatchSampler | None = None
        self._state = {"epoch": 0, "batch_in_epoch": 0}
        self._dp_rank, self._dp_size = 0, 1

    # ---- for subclasses ----------------------------------------------------------------------
    def _setup_key(self, tokenizer: Any) -> tuple:
        """What the prepared splits depend on: ``setup`` loads again when it changes."""
        return (id(tokenizer), self.split, self.val_split, self.seq_length, self.limit_samples)

    def _load(self, tokenizer: Any) -> tuple[Any, Any]:
        """``(train, val)`` rows, ready for ``_collate`` (val None without ``val_split``)."""
        raise NotImplementedError

    def _collate(self, rows: Any, indices: np.ndarray) -> Batch:
        """One micro-batch from rows ``indices`` of ``rows``."""
        raise NotImplementedError

    # ---- setup -------------------------------------------------------------------------------
    def setup(self, tokenizer: Any, dp_rank: int = 0, dp_size: int = 1) -> None:
        """Load and check the splits (cheap when repeated unchanged); build this rank's sampler at the
        current position."""
        check_rank(dp_rank, dp_size)
        self._dp_rank, self._dp_size = dp_rank, dp_size
        _ = self.accumulate_grad_batches  # raises early when not divisible
        key = self._setup_key(tokenizer)
        if key != self._cache_key:
            self._cache_key = None  # a load that fails part-way is redone by the next setup
            self._train, self._val = self._load(tokenizer)
            self._cache_key = key
        if self._sampler is not None:
            self._state = self._sampler.state_dict()
        self._sampler = MicroBatchSampler(len(self._train), self.micro_batch_size, dp_rank, dp_size,
                                          self.shuffle, self.seed)
        self._sampler.load_state_dict(self._state)

    def _require_setup(self) -> MicroBatchSampler:
        """The sampler ``setup`` made; refuses a module that was not set up."""
        if self._sampler is None:
            raise self._setup_first()
        return self._sampler

    def _setup_first(self) -> RuntimeError:
        """The error for a module used before ``setup``."""
        return RuntimeError(f"{type(self).__name__}.setup({self.setup_arg}, dp_rank, dp_size) must run first")

    # ---- properties --------------------------------------------------------------------------
    @property
    def accumulate_grad_batches(self) -> int | None:
        """Micro-batches per optimizer step on each rank (None without ``global_batch_size``)."""
        return accumulation(self.global_batch_size, self.micro_batch_size, self._dp_size)

    @property
    def has_validation(self) -> bool:
        """Whether a ``val_split`` was configured."""
        return self.val_split is not None

    @property
    def micro_batches_per_epoch(self) -> int:
        """Training micro-batches per epoch on this rank."""
        return self._require_setup().batches_per_epoch

    @property
    def train_dataset(self) -> Any:
        """The training rows; ``len()`` gives their number."""
        self._require_setup()
        return self._train

    @property
    def val_dataset(self) -> Any:
        """The validation rows, or None without ``val_split``."""
        self._require_setup()
        return self._val

    # ---- batches -----------------------------------------------------------------------------
    def train_batches(self) -> Iterator[Batch]:
        """Infinite iterator over this rank's training micro-batches, from the current position."""
        for indices in self._require_setup():
            yield self._collate(self._train, indices)

    def val_batches(self) -> list[Batch] | None:
        """Validation micro-batches for this rank in order (None without ``val_split``).

        With one rank every row is used (the last batch may be short); with several, the
        incomplete tail is dropped (with a warning) so all ranks run the same number of batches.
        """
        self._require_setup()
        if self._val is None:
            return None
        drop = self._dp_size > 1
        batches = rank_batches(np.arange(len(self._val)), self.micro_batch_size, self._dp_rank, self._dp_size,
                               drop_last=drop)
        skipped = len(self._val) % (self.micro_batch_size * self._dp_size)
        if drop and skipped:
            logger.warning("val_split: %d rows do not fill a micro-batch on every rank and are skipped", skipped)
        return [self._collate(self._val, b) for b in batches]

    # ---- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Position of the next training micro-batch: ``{"epoch", "batch_in_epoch"}``."""
        return self._sampler.state_dict() if self._sampler is not None else dict(self._state)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume the next ``train_batches()`` at ``state`` (may be called before ``setup``)."""
        if self._sampler is not None:
            self._sampler.load_state_dict(state)
        else:
            self._state = parse_position(state)
