"""Packing layout: capacity respected, each sample once, positions restart per sample."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import datasets
import numpy as np
import pytest

from nemo_automodel.data import HFDatasetDataModule, first_fit_decreasing, pack_sequences
from nemo_automodel.errors import ConfigError


def test_first_fit_decreasing_known_layout():
    assert first_fit_decreasing([3, 7, 2, 5, 5, 1], 10) == [[1, 0], [3, 4], [2, 5]]
    assert first_fit_decreasing([], 10) == []


def _lines_executed(fn, *args) -> int:
    """How many lines of ``fn``'s own body run for ``fn(*args)`` (a count of work, not a time)."""
    count = 0

    def in_fn(frame, event, arg):
        nonlocal count
        count += event == "line"
        return in_fn

    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: in_fn if frame.f_code is fn.__code__ else None)
    try:
        fn(*args)
    finally:
        sys.settrace(previous)
    return count


def test_first_fit_decreasing_places_each_item_in_log_time():
    """Each placement walks the segment tree (~6 lines per level), never the bins: 8x the items (and bins)
    cost ~10x the work, not the ~64x of a scan over the bins."""
    rng = np.random.default_rng(0)
    for n in (1000, 8000):
        lines = _lines_executed(first_fit_decreasing, rng.integers(1, 513, n), 2048)
        assert lines <= 8 * n * np.log2(n), (n, lines)


def test_first_fit_decreasing_properties():
    lengths = np.random.default_rng(0).integers(1, 513, 100_000)
    bins = first_fit_decreasing(lengths, 2048)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    fill = [int(lengths[b].sum()) for b in bins]
    assert max(fill) <= 2048
    assert len(bins) <= int(np.ceil(lengths.sum() / 2048 * 1.01)) + 1  # FFD is near optimal here
    assert bins == first_fit_decreasing(lengths, 2048)  # deterministic


def test_oversized_sample_rejected():
    with pytest.raises(ConfigError, match="11"):
        first_fit_decreasing([3, 11], 10)


def test_pack_sequences_rows():
    samples = [{"input_ids": list(range(n)), "labels": list(range(1, n + 1)), "loss_mask": [1] * n}
               for n in (4, 6, 3, 5)]
    rows = pack_sequences(samples, 10)
    assert sorted(i for r in rows for i in r["sample_index"]) == [0, 1, 2, 3]
    for row in rows:
        assert len(row["input_ids"]) <= 10
        expected = [p for i in row["sample_index"] for p in range(len(samples[i]["input_ids"]))]
        assert row["position_ids"] == expected == row["input_ids"]  # sample tokens are their positions


def test_datamodule_packing(tokenizer):
    lengths = [3, 9, 4, 12, 7, 2, 5, 30]
    ds = datasets.Dataset.from_list([{"input_ids": [100 + i] * (n + 1)} for i, n in enumerate(lengths)])
    dm = HFDatasetDataModule(ds, packed_sequence_size=16, seq_length=64, micro_batch_size=2, shuffle=False)
    dm.setup(tokenizer)
    rows = dm.train_dataset
    seen = []
    for r in range(len(rows)):
        row = rows[r]
        assert len(row["input_ids"]) <= 16
        starts = np.flatnonzero(row["position_ids"] == 0)
        ends = list(starts[1:]) + [len(row["input_ids"])]
        for s, e in zip(starts, ends, strict=True):
            sample = set(row["input_ids"][s:e].tolist())
            assert len(sample) == 1  # one sample per restart, never split
            assert row["position_ids"][s:e].tolist() == list(range(e - s))
            seen.append(sample.pop() - 100)
    assert sorted(seen) == list(range(len(lengths)))  # the 30-token sample was truncated to 16
    batch = next(dm.train_batches())
    width = batch["input_ids"].shape[1]
    for b in range(2):  # pads continue the last sample's positions
        n = int((batch["loss_mask"][b] > 0).nonzero().max()) + 1
        pos = batch["position_ids"][b]
        assert (pos[n:] - pos[n - 1] == np.arange(1, width - n + 1)).all()


@pytest.mark.parametrize("packed", [0, 16])
def test_rows_slice_like_the_sequence_they_are(tokenizer, packed):
    """``train_dataset`` (``Rows``, a ``collections.abc.Sequence``) takes slices; a slice crashed before."""
    ds = datasets.Dataset.from_list([{"input_ids": [100 + i] * (n + 1)} for i, n in enumerate([3, 9, 4, 12, 7])])
    dm = HFDatasetDataModule(ds, packed_sequence_size=packed, seq_length=64, shuffle=False)
    dm.setup(tokenizer)
    rows = dm.train_dataset
    as_lists = lambda picked: [{k: v.tolist() for k, v in row.items()} for row in picked]  # noqa: E731
    assert isinstance(rows, Sequence) and len(rows) > 1
    assert as_lists(rows[1::2]) == as_lists(rows[i] for i in range(1, len(rows), 2))
    assert as_lists(rows[:]) == as_lists(rows) and rows[len(rows):] == []
    with pytest.raises(IndexError):
        rows[len(rows)]


def test_packing_short_of_prompts_names_packed_sequence_size(tokenizer):
    row = {"input_ids": [1] * 40, "labels": [1] * 40, "loss_mask": [0] * 30 + [1] * 10}
    ds = datasets.Dataset.from_list([row])
    dm = HFDatasetDataModule(ds, packed_sequence_size=20, seq_length=64)
    with pytest.raises(ConfigError, match="packed_sequence_size=20 .*shortest prompt has 30 tokens"):
        dm.setup(tokenizer)
