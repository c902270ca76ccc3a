"""Memory-lean loss: fused ``lm_head`` linear + cross-entropy without full ``[tokens, vocab]`` logits.

``linear_cross_entropy(hidden, weight, labels, loss_mask)`` returns the same *summed* masked
cross-entropy as ``masked_cross_entropy(hidden @ weight.T, labels, loss_mask)``. The pure-torch
implementation walks the tokens in chunks; for each chunk it computes the logits, the loss and,
right away, the chunk's gradients w.r.t. the hidden states and the weight (the loss is a scalar,
so backward only rescales them). Peak extra memory is one ``[chunk, vocab]`` block plus a
hidden-sized and a weight-sized gradient, instead of several ``[tokens, vocab]`` fp32 tensors.
Matmuls follow autocast like ``nn.Linear`` (bf16 under bf16 autocast); softmax and sums are fp32.

``fused_lm_head_loss`` plugs it into any Hugging Face causal LM: for one forward call the model's
output projection stops computing logits and computes the loss instead (inside the model's own
forward, so FSDP-gathered weights and tied embeddings work unchanged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F

IMPLS = ("torch", "cce", "liger")
_TARGET_ELEMENTS = 1 << 22  # logits elements per chunk (16 MiB in fp32)


def auto_chunk_size(vocab: int) -> int:
    """Tokens per chunk: a power of two with at most about 4 M logits per chunk (at least 64 tokens)."""
    return max(64, 1 << max(0, (_TARGET_ELEMENTS // max(vocab, 1)).bit_length() - 1))


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    if device_type != "meta" and torch.is_autocast_enabled(device_type):  # meta: the memory planner's rehearsal
        return torch.get_autocast_dtype(device_type)
    return dtype


class _ChunkedLinearCE(torch.autograd.Function):
    """Summed masked CE of ``hidden @ weight.T + bias``; gradients are computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, mask, chunk, dtype, need_grad):
        need_h, need_w = need_grad and hidden.requires_grad, need_grad and weight.requires_grad
        need_b = need_grad and bias is not None and bias.requires_grad
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        g_h = torch.empty_like(hidden) if need_h else None
        g_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        g_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk].to(dtype)
            m = mask[s:s + chunk].float()
            y = torch.where(m != 0, labels[s:s + chunk], 0)
            logits = F.linear(h, w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, y[:, None]).squeeze(1)) * m).sum()
            if not (need_h or need_w or need_b):
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            grad[torch.arange(grad.shape[0], device=grad.device), y] -= 1.0
            grad = grad.mul_(m[:, None]).to(dtype)
            if need_h:
                g_h[s:s + chunk] = grad @ w
            if need_w and grad.dtype == g_w.dtype:
                g_w.addmm_(grad.t(), h)  # no [V, H] temporary
            elif need_w:
                g_w += grad.t() @ h
            if need_b:
                g_b += grad.float().sum(0)
        ctx.save_for_backward(g_h, g_w, g_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        g_h, g_w, g_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        # in place: these buffers are used once, and copies of a [V, H] gradient cost memory
        g_h = g_h.mul_(grad_out.to(g_h.dtype)) if g_h is not None else None
        g_w = g_w.mul_(grad_out).to(w_dtype) if g_w is not None else None
        g_b = g_b.mul_(grad_out).to(b_dtype) if g_b is not None else None
        return g_h, g_w, g_b, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         loss_mask: torch.Tensor, bias: torch.Tensor | None = None,
                         chunk_size: int | None = None, impl: str = "torch") -> torch.Tensor:
    """Summed masked cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``.

    Args:
        hidden: ``[..., H]`` final hidden states; ``labels``/``loss_mask``: ``[...]`` (already shifted).
        weight: ``[V, H]`` output projection (may be frozen, trainable or tied to the embeddings).
        chunk_size: tokens per chunk for ``impl="torch"`` (default: ``auto_chunk_size(V)``).
        impl: ``"torch"`` (any device), ``"cce"`` (cut-cross-entropy) or ``"liger"`` (Triton, CUDA);
            the last two need a 0/1 ``loss_mask``.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y, m = labels.reshape(-1), loss_mask.reshape(-1)
    if impl == "cce" and h.is_cuda and torch.is_autocast_enabled("cuda") and h.dtype == torch.float32:
        dtype = torch.get_autocast_dtype("cuda")  # what autocast gives the logits matmul anyway
        h, weight = h.to(dtype), weight.to(dtype)
    if impl == "cce" and (bias is not None or (h.is_cuda and h.dtype == torch.float32)):
        # cut-cross-entropy 25.1.1 has no bias term and its CUDA backward needs bf16/fp16 inputs
        # (both seen on an H200): the chunked torch loss computes the same loss there
        impl = "torch"
    if impl == "torch":
        chunk = chunk_size or auto_chunk_size(weight.shape[0])
        dtype = _compute_dtype(h.device.type, h.dtype)
        return _ChunkedLinearCE.apply(h, weight, bias, y, m, int(chunk), dtype, torch.is_grad_enabled())
    targets = y.masked_fill(m == 0, -100)
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

        kw = {} if h.is_cuda else {"impl": "torch_compile"}  # CCE's Triton kernel needs CUDA
        return cce(h, weight, targets, ignore_index=-100, reduction="sum", **kw).float()
    if impl == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, h, targets, bias).float()
    raise ValueError(f"impl={impl!r}: use one of {IMPLS}")


def output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """``model.get_output_embeddings()`` (a peft wrapper forwards it); None when the model has no such method."""
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if callable(get_head) else None


def lean_head_unsupported(model: torch.nn.Module) -> str | None:
    """Why the fused head cannot stand in for ``model``'s logits (None when it can)."""
    head = output_layer(model)
    if type(head) is not torch.nn.Linear:
        return f"the output layer is {type(head).__name__}, not a plain nn.Linear (e.g. a LoRA target)"
    cfg = getattr(model, "config", None)
    for attr, neutral in (("final_logit_softcapping", None), ("logit_scale", None), ("logits_scaling", 1.0),
                          ("output_multiplier_scale", None)):
        value = getattr(cfg, attr, neutral)
        if value not in (neutral, None, 1, 1.0):
            return f"config.{attr}={value} transforms the logits"
    return None


@contextlib.contextmanager
def fused_lm_head_loss(model: torch.nn.Module, labels: torch.Tensor, loss_mask: torch.Tensor,
                       chunk_size: int | None = None, impl: str = "torch") -> Iterator[dict[str, torch.Tensor]]:
    """For forward calls inside the block, ``model``'s output layer returns empty logits
    ``[..., 0]`` and stores the summed masked CE in the yielded dict under ``"loss"``."""
    head = cast(torch.nn.Linear, output_layer(model))  # callers check lean_head_unsupported(model) first
    out: dict[str, torch.Tensor] = {}

    def forward(h: torch.Tensor) -> torch.Tensor:
        n = h.shape[-2]  # HF models may keep only the last positions (logits_to_keep)
        out["loss"] = linear_cross_entropy(h, head.weight, labels[..., -n:], loss_mask[..., -n:], head.bias,
                                           chunk_size, impl)
        return h.new_zeros(*h.shape[:-1], 0)

    vars(head)["forward"] = forward  # an instance attribute shadows Linear.forward until the block ends
    try:
        yield out
    finally:
        del head.forward
