"""Context parallel for HF models on CUDA: PyTorch's ``context_parallel`` over a ``cp`` mesh, per micro-batch.

Inside `shard_micro_batch` a micro-batch dict holds this rank's part of every row: ``input_ids``,
``labels`` (already shifted by the data module, so no token needs its neighbour), ``loss_mask`` and
``position_ids`` are padded at the end to a multiple of 2 x C and split along the sequence with
PyTorch's head-tail load balancer (rank r keeps chunks r and 2C-1-r of 2C), and
``F.scaled_dot_product_attention`` is ring attention over the cp ranks. On exit the dict holds its
original tensors again.

What CP needs, and why:
- CUDA and the flash / memory-efficient / cuDNN SDPA kernels: PyTorch registers the sharding of
  attention only for those (not for the CPU kernels, not for a mask); the math backend is disabled.
- causal attention over whole rows: packed rows (position ids restarting inside a row) need a
  block-diagonal mask that CP's SDPA does not take, and are refused in one line.
- position ids are always passed (arange when a batch has none) and sharded like the tokens, so RoPE
  sees each token's true position; transformers' packed-row probe, which would read the
  rearranged shard's jumps as sample starts, is skipped inside the context.
- padding adds tokens with ``loss_mask`` 0 after the last one: causal attention never lets a real
  token see them, and the loss ignores them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from nemo_automodel.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

SEQ_KEYS = ("input_ids", "labels", "loss_mask", "position_ids")  # [batch, seq] tensors split along dim 1


def check_attention(problem: str | None, cp_size: int) -> None:
    """Refuse a model whose attention cannot run context parallel (``problem``: what it needs, from the model's
    ``context_parallel_problem``; the HF models need ``F.scaled_dot_product_attention``, which CP replaces)."""
    if problem:
        raise ConfigError(f"context_parallel_size={cp_size} needs {problem}")


def padded_length(seq_length: int, cp_size: int) -> int:
    """The sequence length rounded up to a multiple of 2 x ``cp_size`` (the load balancer's chunks)."""
    step = 2 * cp_size
    return -(-seq_length // step) * step


def check_unpacked(position_ids: torch.Tensor, cp_size: int) -> None:
    """Refuse rows whose positions are not 0, 1, 2, ... (packed samples need a block-diagonal mask)."""
    arange = torch.arange(position_ids.shape[-1], device=position_ids.device)
    if not bool((position_ids == arange).all()):
        raise ConfigError(f"context_parallel_size={cp_size} trains causal attention over whole rows, but a batch has "
                          "packed rows (position_ids restart inside a row): set the data module's "
                          "packed_sequence_size=0 or use context_parallel_size=1")


def pad_batch(batch: dict[str, torch.Tensor], cp_size: int) -> dict[str, torch.Tensor]:
    """New ``SEQ_KEYS`` tensors of ``batch``, padded at the end to `padded_length` (``position_ids``
    added as arange when missing, continued over the padding; padding has ``loss_mask`` 0)."""
    ids = batch["input_ids"]
    rows, length = ids.shape
    target = padded_length(length, cp_size)
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=ids.device).expand(rows, length)
    check_unpacked(positions, cp_size)
    out = {}
    for key, value in (("input_ids", ids), ("labels", batch["labels"]), ("loss_mask", batch["loss_mask"]),
                       ("position_ids", positions)):
        pad = torch.zeros((rows, target - length), dtype=value.dtype, device=value.device)
        if key == "position_ids":
            pad = pad + torch.arange(length, target, dtype=value.dtype, device=value.device)
        out[key] = torch.cat([value, pad], dim=1)
    return out


@contextlib.contextmanager
def _no_packed_row_probe() -> Iterator[None]:
    """Skip transformers' packed-sequence detection (rows were checked unpacked before sharding)."""
    import transformers.masking_utils as masking

    saved = getattr(masking, "find_packed_sequence_indices", None)
    if saved is not None:
        masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        if saved is not None:
            masking.find_packed_sequence_indices = saved


@contextlib.contextmanager
def shard_micro_batch(batch: dict[str, torch.Tensor], cp_mesh: DeviceMesh) -> Iterator[dict[str, torch.Tensor]]:
    """Within the context, ``batch`` holds this cp rank's load-balanced part of each row and attention
    runs as ring attention over ``cp_mesh`` (a 1-D DeviceMesh); see the module docstring."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    original = {k: batch[k] for k in SEQ_KEYS if k in batch}
    padded = pad_batch(batch, cp_mesh.size())
    buffers = [padded[k] for k in SEQ_KEYS]
    batch.update(padded)
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    try:
        with sdpa_kernel(backends), _no_packed_row_probe(), context_parallel(
                cp_mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers), no_restore_buffers=set(buffers)):
            yield batch
    finally:
        for key in SEQ_KEYS:
            batch.pop(key, None)
        batch.update(original)
