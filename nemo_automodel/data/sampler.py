"""Deterministic, resumable, data-parallel micro-batch order.

Every rank computes the same global permutation per epoch (``torch.Generator`` seeded with
``seed + epoch``; identity order without shuffling). Rank ``r`` takes micro-batch ``b`` from
``perm[(b * dp_size + r) * mbs : + mbs]``; the incomplete tail is dropped so all ranks see the
same number of micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

from nemo_automodel.errors import ConfigError, bad_value, check_int


def check_rank(dp_rank: int, dp_size: int) -> None:
    """A data module's ``setup(dp_rank, dp_size)`` arguments, checked in one line."""
    check_int("dp_size", dp_size, 1)
    if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
        raise bad_value("dp_rank", dp_rank, f"a rank in 0..{dp_size - 1}")


def accumulation(global_batch_size: int | None, micro_batch_size: int, dp_size: int) -> int | None:
    """Micro-batches per optimizer step on each rank (None without a global batch size)."""
    if global_batch_size is None:
        return None
    per_step = micro_batch_size * dp_size
    if global_batch_size % per_step:
        raise bad_value("global_batch_size", global_batch_size,
                        f"a multiple of micro_batch_size={micro_batch_size} x dp_size={dp_size} = {per_step}")
    return global_batch_size // per_step


def parse_position(state: Mapping[str, int]) -> dict[str, int]:
    """A saved data position ``{"epoch", "batch_in_epoch"}`` as ints, or one line saying what it must be."""
    try:
        return {"epoch": int(state["epoch"]), "batch_in_epoch": int(state["batch_in_epoch"])}
    except (KeyError, TypeError, ValueError) as e:
        raise bad_value("data state_dict", state, "{'epoch': int, 'batch_in_epoch': int}") from e


def epoch_order(num_rows: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The global row order of one epoch (identical on every rank and in every process)."""
    if not shuffle:
        return np.arange(num_rows, dtype=np.int64)
    gen = torch.Generator().manual_seed(int(seed) + int(epoch))
    return torch.randperm(num_rows, generator=gen).numpy()


def rank_batches(order: np.ndarray, micro_batch_size: int, dp_rank: int, dp_size: int,
                 drop_last: bool = True) -> list[np.ndarray]:
    """Split a global order into this rank's micro-batches (row indices).

    With ``drop_last=False`` the leftover rows also form batches: whole micro-batches dealt out
    in the same round-robin, then a final short one, so ranks may differ by one batch.
    """
    step = micro_batch_size * dp_size
    full = len(order) // step
    out = [order[(b * dp_size + dp_rank) * micro_batch_size:][:micro_batch_size] for b in range(full)]
    if not drop_last:
        tail = order[full * step:]
        out += [c for c in np.array_split(tail, range(micro_batch_size, len(tail), micro_batch_size))
                if len(c)][dp_rank::dp_size]
    return out


class MicroBatchSampler:
    """Infinite, resumable iterator over this rank's micro-batches (lists of row indices).

    ``state_dict()`` is the position of the next micro-batch to be yielded, so a run restored
    with ``load_state_dict`` continues on exactly the batch an uninterrupted run would yield next.
    """

    def __init__(self, num_rows: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 shuffle: bool = True, seed: int = 1234):
        if not 0 <= dp_rank < dp_size:
            raise bad_value("dp_rank", dp_rank, f"a rank in 0..{dp_size - 1} (dp_size={dp_size})")
        self.num_rows, self.micro_batch_size = num_rows, micro_batch_size
        self.dp_rank, self.dp_size, self.shuffle, self.seed = dp_rank, dp_size, shuffle, seed
        self.epoch = 0
        self.batch_in_epoch = 0
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"the training set has {num_rows} rows but one step over dp_size={dp_size} ranks needs "
                f"micro_batch_size*dp_size={micro_batch_size * dp_size}: add data or lower micro_batch_size"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch on this rank (the same on every rank)."""
        return self.num_rows // (self.micro_batch_size * self.dp_size)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's micro-batches (row indices) for one epoch."""
        order = epoch_order(self.num_rows, epoch, self.seed, self.shuffle)
        return rank_batches(order, self.micro_batch_size, self.dp_rank, self.dp_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            epoch, start = self.epoch, self.batch_in_epoch
            batches = self.epoch_batches(epoch)
            for b in range(start, len(batches)):
                # Advance before yielding: once the caller holds batch b, the next one is b + 1.
                self.epoch, self.batch_in_epoch = (epoch, b + 1) if b + 1 < len(batches) else (epoch + 1, 0)
                yield batches[b]

    def state_dict(self) -> dict[str, int]:
        """Position of the next micro-batch: ``{"epoch": ..., "batch_in_epoch": ...}``."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at the given position (the next ``iter()`` starts there)."""
        epoch, batch = parse_position(state).values()
        if epoch < 0 or batch < 0:
            raise bad_value("data state_dict", dict(state), "non-negative epoch and batch_in_epoch")
        epoch += batch // self.batches_per_epoch
        self.epoch, self.batch_in_epoch = epoch, batch % self.batches_per_epoch
