"""``HFDatasetDataModule``: lazy, NeMo-compatible data for causal-LM fine-tuning.

The constructor only records and checks its arguments (it sits in a Fiddle graph built far from
the data); ``setup(tokenizer, dp_rank, dp_size)`` loads, maps, formats, filters and packs.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from nemo_automodel.data.base import Batch, SampledDataModule
from nemo_automodel.data.collate import collate
from nemo_automodel.data.formatting import Formatting, check_columns, check_formatting, make_formatter
from nemo_automodel.data.loading import load_split, open_local
from nemo_automodel.data.rows import Rows, SampleStore, SplitAudit
from nemo_automodel.errors import ConfigError, bad_value, check_int

if TYPE_CHECKING:  # datasets is imported in setup(): building a graph stays fast
    import datasets

logger = logging.getLogger(__name__)


def _features() -> datasets.Features:
    """Column types of a formatted split."""
    import datasets

    return datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int64")),
        "labels": datasets.Sequence(datasets.Value("int64")),
        "loss_mask": datasets.Sequence(datasets.Value("float32")),
        "prompt_len": datasets.Value("int64"),
        "full_len": datasets.Value("int64"),
        "replies": datasets.Value("int64"),
    })


class HFDatasetDataModule(SampledDataModule):
    """Micro-batches for SFT / pretraining from any ``datasets`` source.

    Args:
        path_or_dataset: ``Dataset``, ``DatasetDict``, local file(s) (.json/.jsonl/.parquet/.csv/
            .txt), a ``{split: files}`` dict, a ``save_to_disk`` folder, or a Hub dataset name.
        split / val_split: split names (aliases: val/valid/dev/eval -> validation), slices allowed.
        seq_length: max positions per sample after shifting (longer samples are truncated).
        micro_batch_size / global_batch_size: rows per micro-batch / per optimizer step.
        pad_token_id: pad id (default: the tokenizer's pad id, else its EOS id).
        formatting: None (pre-tokenized rows), "squad", "chat", "text" or ``fn(example, tokenizer)``.
        packed_sequence_size: pack samples into rows of this many tokens (0: no packing).
        shuffle / seed: epoch order (``torch.Generator`` seeded with ``seed + epoch``).
        limit_samples: keep only the first N rows of the training split.
        num_proc: processes for ``Dataset.map``.
        **load_kwargs: passed to ``datasets.load_dataset`` (e.g. ``name``, ``cache_dir``; NeMo's DataLoader
            knobs, e.g. ``num_workers``, are dropped).
    """

    def __init__(self, path_or_dataset: Any, split: str = "train", val_split: str | None = None,
                 seq_length: int = 2048, micro_batch_size: int = 1, global_batch_size: int | None = None,
                 pad_token_id: int | None = None, formatting: Formatting = None,
                 packed_sequence_size: int = 0,
                 shuffle: bool = True, seed: int = 1234, limit_samples: int | None = None,
                 num_proc: int | None = None, **load_kwargs: Any):
        check_int("pad_token_id", pad_token_id, 0, allow_none=True)
        check_int("num_proc", num_proc, 1, allow_none=True)
        if packed_sequence_size == 1:
            raise bad_value("packed_sequence_size", 1, "0 (no packing) or at least 2 tokens")
        check_formatting(formatting)
        super().__init__(path_or_dataset, split, val_split, seq_length, micro_batch_size, global_batch_size,
                         packed_sequence_size, shuffle, seed, limit_samples, **load_kwargs)
        self.pad_token_id, self.formatting, self.num_proc = pad_token_id, formatting, num_proc
        self._maps: list[tuple[Callable, dict[str, Any]]] = []
        self._audits: dict[str, SplitAudit] = {}

    # ---- recorded maps -------------------------------------------------------------------
    def map(self, function: Callable, **kwargs: Any) -> HFDatasetDataModule:
        """Record a ``Dataset.map(function, **kwargs)`` to run at ``setup`` (in call order)."""
        if not callable(function):
            raise bad_value("map function", function, "a callable")
        self._maps.append((function, kwargs))
        self._cache_key = None
        return self

    # ---- setup -----------------------------------------------------------------------------
    def _setup_key(self, tokenizer: Any) -> tuple:
        return super()._setup_key(tokenizer) + (len(self._maps), self.formatting, self.packed_sequence_size,
                                                self.pad_token_id)

    def _load(self, tokenizer: Any) -> tuple[Rows, Rows | None]:
        """Load, map, format, filter and pack both splits."""
        pad = self._resolve_pad(tokenizer)
        splits = open_local(self.path_or_dataset, self.load_kwargs)
        train = self._prepare(tokenizer, splits, self.split, "split", pad, self.limit_samples)
        val = self._prepare(tokenizer, splits, self.val_split, "val_split", pad, None) if self.val_split else None
        self._pad_id = pad
        return train, val

    def _resolve_pad(self, tokenizer: Any) -> int:
        for pad in (self.pad_token_id, getattr(tokenizer, "pad_token_id", None),
                    getattr(tokenizer, "eos_token_id", None)):
            if pad is not None:
                return int(pad)
        raise ConfigError("pad_token_id=None and the tokenizer has neither a pad nor an EOS token: "
                          "pass pad_token_id=<id> to the data module")

    @property
    def _max_len(self) -> int:
        size = self.packed_sequence_size
        return min(self.seq_length, size) if size else self.seq_length

    def _prepare(self, tokenizer: Any, splits: datasets.DatasetDict | None, split: str, field: str,
                 pad: int, limit: int | None) -> Rows:
        ds = load_split(self.path_or_dataset, splits, split, field, self.load_kwargs)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        self._check_nonempty(ds, split, field, "")
        for function, kwargs in self._maps:
            ds = ds.map(function, **kwargs)
        self._check_nonempty(ds, split, field, " after the recorded .map calls")
        check_columns(self.formatting, ds.column_names, split)
        store = SampleStore.from_dataset(self._format(ds, tokenizer, pad))
        keep = store.loss_tokens() > 0
        self._audits[field] = audit = SplitAudit(store.full_len, store.prompt_len, store.replies, keep, self._max_len)
        self._warn_truncated(audit, split)
        return Rows(self._drop_empty(store, keep, split), self.packed_sequence_size)

    @staticmethod
    def _check_nonempty(ds: datasets.Dataset, split: str, field: str, when: str) -> None:
        if len(ds) == 0:
            raise ConfigError(f"{field}={split!r} has no rows{when}: pick a non-empty split or slice")

    def _format(self, ds: datasets.Dataset, tokenizer: Any, pad: int) -> datasets.Dataset:
        fmt = make_formatter(self.formatting, tokenizer, self._max_len, pad)
        # In memory, so the fingerprint only labels the result: no need to hash the tokenizer.
        tag = f"{ds._fingerprint}|{self.formatting!r}|{id(tokenizer)}|{self._max_len}|{pad}"
        return ds.map(fmt, batched=True, with_indices=True, remove_columns=ds.column_names,
                      features=_features(), num_proc=self.num_proc, keep_in_memory=True, desc="formatting",
                      new_fingerprint=hashlib.sha256(tag.encode()).hexdigest()[:16])

    def _warn_truncated(self, audit: SplitAudit, split: str) -> None:
        cut = audit.truncated & audit.kept  # rows that lost everything are reported as dropped
        if cut.any():
            field = "packed_sequence_size" if self._max_len < self.seq_length else "seq_length"
            logger.warning("split %r: %d of %d rows are longer than %s=%d and were truncated (the longest has %d "
                           "tokens; a cut reply loses its end-of-turn token): raise %s or run the data preflight",
                           split, int(cut.sum()), len(cut), field, self._max_len, int(audit.full_len.max()), field)

    def _drop_empty(self, store: SampleStore, keep: np.ndarray, split: str) -> SampleStore:
        if keep.all():
            return store
        truncated = ~keep & (store.prompt_len >= 0)
        if not keep.any():
            raise self._all_dropped_error(store, truncated, split)
        logger.warning("split %r: dropped %d of %d rows with no token to train on (%d lost them to "
                       "truncation at %d tokens)", split, int((~keep).sum()), len(store),
                       int(truncated.sum()), self._max_len)
        return store.select(keep)

    def _all_dropped_error(self, store: SampleStore, truncated: np.ndarray, split: str) -> ConfigError:
        if not truncated.any():
            return ConfigError(f"split {split!r}: no row has a token to train on with formatting="
                               f"{self.formatting!r} (e.g. no answer or assistant turn): check the data")
        field, value = (("packed_sequence_size", self.packed_sequence_size)
                        if self._max_len < self.seq_length else ("seq_length", self.seq_length))
        shortest = int(store.prompt_len[truncated].min())
        return ConfigError(f"{field}={value} is shorter than the prompts of split {split!r} (the "
                           f"shortest prompt has {shortest} tokens), so every row loses its trained "
                           f"tokens: raise {field}")

    # ---- text-only views ------------------------------------------------------------------
    def audit(self, which: str = "train") -> SplitAudit:
        """Truncation and dropped rows of the ``"train"`` or ``"val"`` split (after ``setup``)."""
        self._require_setup()
        field = {"train": "split", "val": "val_split"}.get(which)
        if field not in self._audits:
            raise bad_value("audit split", which, "'train', or 'val' with a val_split")
        return self._audits[field]

    @property
    def pad_id(self) -> int:
        """The pad id batches use (after ``setup``)."""
        self._require_setup()
        return self._pad_id

    def _collate(self, rows: Rows, indices: np.ndarray) -> Batch:
        return collate([rows[int(i)] for i in indices], self._pad_id)


class SquadHFDataModule(HFDatasetDataModule):
    """``HFDatasetDataModule`` with ``formatting="squad"`` (context/question/answers columns)."""

    def __init__(self, path_or_dataset: Any, **kwargs: Any):
        kwargs.setdefault("formatting", "squad")
        super().__init__(path_or_dataset, **kwargs)


class ChatHFDataModule(HFDatasetDataModule):
    """``HFDatasetDataModule`` with ``formatting="chat"`` (a ``messages`` column)."""

    def __init__(self, path_or_dataset: Any, **kwargs: Any):
        kwargs.setdefault("formatting", "chat")
        super().__init__(path_or_dataset, **kwargs)
