"""Formatted samples held as flat numpy arrays, and the training rows (plain or packed) over them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

import numpy as np

from nemo_automodel.data.packing import first_fit_decreasing, packed_position_ids

if TYPE_CHECKING:
    import datasets


@dataclass
class SampleStore:
    """Shifted samples concatenated: sample ``i`` is ``[offsets[i]:offsets[i+1]]`` of each array."""

    input_ids: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray
    prompt_len: np.ndarray
    full_len: np.ndarray  # positions before truncation
    replies: np.ndarray  # replies per sample (-1: unknown)

    @classmethod
    def from_dataset(cls, ds: datasets.Dataset) -> SampleStore:
        """Read the columns of a formatted split (see ``data/formatting.py``)."""
        import pyarrow.compute as pc

        table = ds.with_format("arrow")[:]
        ids = table.column("input_ids")
        lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = {k: pc.list_flatten(table.column(k)).to_numpy(zero_copy_only=False)
                for k in ("input_ids", "labels", "loss_mask")}
        return cls(flat["input_ids"].astype(np.int64), flat["labels"].astype(np.int64),
                   flat["loss_mask"].astype(np.float32), np.concatenate([[0], np.cumsum(lengths)]),
                   *(table.column(k).to_numpy().astype(np.int64) for k in ("prompt_len", "full_len", "replies")))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def loss_tokens(self) -> np.ndarray:
        """Summed ``loss_mask`` per sample."""
        if not len(self.loss_mask):
            return np.zeros(len(self))
        return np.where(self.lengths > 0, np.add.reduceat(self.loss_mask, self.offsets[:-1]), 0.0)

    def select(self, keep: np.ndarray) -> SampleStore:
        """The samples where the boolean ``keep`` is set."""
        token_keep = np.repeat(keep, self.lengths)
        lengths = self.lengths[keep]
        return SampleStore(self.input_ids[token_keep], self.labels[token_keep], self.loss_mask[token_keep],
                           np.concatenate([[0], np.cumsum(lengths)]), self.prompt_len[keep], self.full_len[keep],
                           self.replies[keep])

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """One sample's ``input_ids``, ``labels`` and ``loss_mask``."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return {"input_ids": self.input_ids[lo:hi], "labels": self.labels[lo:hi],
                "loss_mask": self.loss_mask[lo:hi]}


@dataclass
class SplitAudit:
    """What formatting did to a split: per formatted sample, before rows with nothing to train on
    were dropped (``kept``), its length before truncation, its first target (-1: none) and its
    number of replies (-1: unknown)."""

    full_len: np.ndarray
    prompt_len: np.ndarray
    replies: np.ndarray
    kept: np.ndarray
    max_len: int

    @property
    def truncated(self) -> np.ndarray:
        return self.full_len > self.max_len


class Rows(Sequence[dict[str, np.ndarray]]):
    """The rows batches are made of: one sample each, or (``pack_size > 0``) packed samples.

    A packed row concatenates its samples and carries ``position_ids`` restarting at 0 per
    sample; a plain row has no ``position_ids`` (the collator uses ``arange``).
    """

    def __init__(self, store: SampleStore, pack_size: int = 0):
        self.store = store
        self.bins = first_fit_decreasing(store.lengths, pack_size) if pack_size > 0 else None

    def __len__(self) -> int:
        return len(self.store) if self.bins is None else len(self.bins)

    @overload
    def __getitem__(self, i: int) -> dict[str, np.ndarray]: ...

    @overload
    def __getitem__(self, i: slice) -> list[dict[str, np.ndarray]]: ...

    def __getitem__(self, i: int | slice) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0 or i >= len(self):
            raise IndexError(i)
        if self.bins is None:
            return self.store.sample(int(i))
        parts = [self.store.sample(j) for j in self.bins[i]]
        row = {k: np.concatenate([p[k] for p in parts]) for k in ("input_ids", "labels", "loss_mask")}
        row["position_ids"] = packed_position_ids([len(p["input_ids"]) for p in parts])
        return row

    def samples_in(self, i: int) -> list[int]:
        """Indices of the formatted samples in row ``i``."""
        return [int(i)] if self.bins is None else list(self.bins[i])
