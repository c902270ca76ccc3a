"""Micro-batch order: deterministic, disjoint across ranks, exactly resumable."""

from __future__ import annotations

import itertools
import subprocess
import sys

import datasets
import torch

from nemo_automodel.data import HFDatasetDataModule

N = 23  # not a multiple of micro_batch_size * dp_size: the tail is dropped


def _module(tokenizer, dp_rank=0, dp_size=1, **kw) -> HFDatasetDataModule:
    ds = datasets.Dataset.from_list([{"input_ids": [i] * (2 + i % 5)} for i in range(N)])
    kw = {"micro_batch_size": 2, "seed": 7, **kw}
    dm = HFDatasetDataModule(ds, **kw)
    dm.setup(tokenizer, dp_rank=dp_rank, dp_size=dp_size)
    return dm


def _ids(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()  # every token of sample i is i


def _take(dm, n) -> list[list[int]]:
    return [_ids(b) for b in itertools.islice(dm.train_batches(), n)]


def test_same_seed_same_batches_and_batch_shapes(tokenizer):
    a, b = _module(tokenizer), _module(tokenizer)
    batches_a = list(itertools.islice(a.train_batches(), 30))
    batches_b = list(itertools.islice(b.train_batches(), 30))
    for x, y in zip(batches_a, batches_b, strict=True):
        assert x.keys() == y.keys() == {"input_ids", "labels", "loss_mask", "position_ids", "num_tokens"}
        for k in x:
            assert torch.equal(x[k], y[k])
    assert _take(_module(tokenizer, seed=8), 11) != _take(a, 11)


def test_epoch_is_a_permutation_reshuffled_each_epoch(tokenizer):
    dm = _module(tokenizer)
    assert dm.micro_batches_per_epoch == N // 2
    batches = _take(dm, 2 * dm.micro_batches_per_epoch)
    first, second = batches[: N // 2], batches[N // 2:]
    for epoch in (first, second):
        flat = [i for b in epoch for i in b]
        assert len(set(flat)) == len(flat) == 2 * (N // 2)
    assert first != second


def test_no_shuffle_is_identity_order(tokenizer):
    dm = _module(tokenizer, shuffle=False)
    assert _take(dm, 3) == [[0, 1], [2, 3], [4, 5]]


def test_two_ranks_disjoint_and_equal_length(tokenizer):
    r0, r1 = _module(tokenizer, 0, 2), _module(tokenizer, 1, 2)
    assert r0.micro_batches_per_epoch == r1.micro_batches_per_epoch == N // 4
    n = r0.micro_batches_per_epoch
    s0 = {i for b in _take(r0, n) for i in b}
    s1 = {i for b in _take(r1, n) for i in b}
    assert not s0 & s1 and len(s0) == len(s1) == 2 * n
    # Same global order as one rank with micro_batch_size 4: rank r has the r-th half of each.
    single = _take(_module(tokenizer, micro_batch_size=4), n)
    halves = zip(_take(_module(tokenizer, 0, 2), n), _take(_module(tokenizer, 1, 2), n), strict=True)
    assert [sorted(b) for b in single] == [sorted(a + b) for a, b in halves]


def test_resume_continues_exactly_also_across_epochs(tokenizer):
    reference = _take(_module(tokenizer), 40)
    per_epoch = N // 2
    for stop in (3, per_epoch - 1, per_epoch, per_epoch + 2):
        first = _module(tokenizer)
        it = first.train_batches()
        seen = [_ids(next(it)) for _ in range(stop)]
        state = first.state_dict()
        assert state == {"epoch": stop // per_epoch, "batch_in_epoch": stop % per_epoch}
        resumed = _module(tokenizer)
        resumed.load_state_dict(state)
        assert seen + _take(resumed, 40 - stop) == reference


def test_state_loaded_before_setup(tokenizer):
    reference = _take(_module(tokenizer), 15)
    ds = datasets.Dataset.from_list([{"input_ids": [i] * (2 + i % 5)} for i in range(N)])
    dm = HFDatasetDataModule(ds, micro_batch_size=2, seed=7)
    dm.load_state_dict({"epoch": 1, "batch_in_epoch": 2})
    dm.setup(tokenizer)
    assert _take(dm, 2) == reference[N // 2 + 2: N // 2 + 4]


def test_fresh_process_gives_the_same_order(tokenizer):
    code = ("import sys, torch; from nemo_automodel.data import epoch_order; "
            "print(epoch_order(23, 1, 7, True).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    from nemo_automodel.data import epoch_order
    assert out.strip() == str(epoch_order(23, 1, 7, True).tolist())
    dm = _module(tokenizer)
    second_epoch = _take(dm, 2 * dm.micro_batches_per_epoch)[dm.micro_batches_per_epoch:]
    order = epoch_order(23, 1, 7, True).tolist()
    assert [i for b in second_epoch for i in b] == order[: 2 * (N // 2)]


def test_val_batches_sequential_and_sharded(tokenizer):
    val = datasets.Dataset.from_list([{"input_ids": [i, i]} for i in range(7)])
    ds = datasets.DatasetDict(train=datasets.Dataset.from_list([{"input_ids": [1, 2]}] * 4), validation=val)
    one = HFDatasetDataModule(ds, val_split="val", micro_batch_size=2)
    one.setup(tokenizer)
    assert [_ids(b) for b in one.val_batches()] == [[0, 1], [2, 3], [4, 5], [6]]
    shards = []
    for rank in (0, 1):
        dm = HFDatasetDataModule(ds, val_split="val", micro_batch_size=2)
        dm.setup(tokenizer, dp_rank=rank, dp_size=2)
        shards.append([_ids(b) for b in dm.val_batches()])
    assert shards == [[[0, 1]], [[2, 3]]]
    no_val = HFDatasetDataModule(ds)
    no_val.setup(tokenizer)
    assert no_val.val_batches() is None


def test_accumulate_grad_batches(tokenizer):
    dm = _module(tokenizer, 0, 2, micro_batch_size=2, global_batch_size=8)
    assert dm.accumulate_grad_batches == 2
