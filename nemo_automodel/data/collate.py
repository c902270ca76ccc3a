"""Rows -> micro-batch tensors, right-padded to the longest row.

Batch convention shared with the trainer: ``input_ids``/``labels`` (already shifted: ``labels[b, t]``
is the target of position ``t``) LongTensor [B, T], ``loss_mask`` float32 [B, T] (0 on prompt and
pad), ``position_ids`` LongTensor [B, T] (pads continue the row's last count). No attention mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

BATCH_KEYS = ("input_ids", "labels", "loss_mask", "position_ids")


def collate(rows: Sequence[Mapping[str, Sequence[Any] | np.ndarray]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack rows (``input_ids``, ``labels``, ``loss_mask`` and optional ``position_ids``) into a
    right-padded batch. Pads get ``pad_token_id`` as input and label and 0 loss weight; a row
    without ``position_ids`` gets ``arange``; pad positions continue from the row's last one.
    """
    lengths = [len(r["input_ids"]) for r in rows]
    bsz, width = len(rows), max(lengths)
    input_ids = np.full((bsz, width), pad_token_id, dtype=np.int64)
    labels = np.full((bsz, width), pad_token_id, dtype=np.int64)
    loss_mask = np.zeros((bsz, width), dtype=np.float32)
    position_ids = np.tile(np.arange(width, dtype=np.int64), (bsz, 1))
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        input_ids[b, :n] = row["input_ids"]
        labels[b, :n] = row["labels"]
        loss_mask[b, :n] = row["loss_mask"]
        if row.get("position_ids") is not None:
            position_ids[b, :n] = row["position_ids"]
            position_ids[b, n:] = position_ids[b, n - 1] + 1 + np.arange(width - n)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "num_tokens": torch.tensor(lengths, dtype=torch.int64),
    }
