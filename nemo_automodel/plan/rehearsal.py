"""One training micro-step rehearsed on the meta device, with the live bytes of every tensor recorded.

The model runs forward, the real loss (``models.loss`` or the chunked loss) and backward on meta
tensors: no data, no compute, but every tensor autograd allocates, keeps and frees is seen. A
``TorchDispatchMode`` registers each new storage (views and in-place results share their
storage, so nothing is counted twice) with a ``weakref.finalize`` that subtracts it again when
the storage dies. After every allocation the live bytes are appended to a `Timeline`, split by
kind: activations (everything the forward keeps for backward, and backward's temporaries),
logits + loss (what the output layer and the loss allocate, forward and backward), and
parameter gradients (re-tagged when autograd accumulates them into ``.grad``), for decoder
blocks and for the rest of the model separately (FSDP2 shards them at different times).
Parameters and buffers exist before the rehearsal and are not counted here.

What the meta device would do differently from the real run is corrected for:
- attention: on meta, ``scaled_dot_product_attention`` always takes the math path (it stores
  ``[heads, seq, seq]`` probabilities). Real runs use fused kernels: on a GPU flash /
  memory-efficient attention (they keep q, k, v, the output and a ``[heads, seq]`` log-sum-exp),
  on a CPU whatever ``torch._fused_sdp_choice`` picks for the same shapes and dtypes. The
  meta-device call is routed to the CPU flash kernel's meta implementation, which keeps exactly
  those tensors (a boolean mask is first turned into a float one, as ``F.scaled_dot_product_attention``
  does), or left on the math path where the CPU would take it too;
- data-dependent mask checks: transformers looks at the position ids for packed sequences
  (``.all()`` on a tensor, impossible on meta). Unpacked rows are declared unpacked; for packed rows
  the sequence indices are computed without the check, and transformers builds its block-diagonal
  mask from them as in the real run (the model's own attention mask stays None, as ours does);
- ``_grouped_mm`` (the experts' default kernel in transformers) has a meta function for bf16 only;
  other dtypes are shaped through it and handed back in their own dtype (``_on_meta``);
- ``torch.autocast`` raises on meta; peft's fused-experts LoRA disables it around its fold, which is
  a no-op there;
- autocast, which has no meta implementation: ``bf16-mixed`` over fp32 weights is emulated by
  casting the inputs, weights and bias of every ``nn.Linear`` and the q/k/v of attention to the
  autocast dtype, what autocast does for those ops (each cast is a new tensor that backward keeps);
- a 4-bit base: bitsandbytes' ``Linear4bit`` (0.50) casts its input to the compute dtype,
  dequantizes the weight into a temporary for each matmul (forward and backward), keeps nothing
  but the packed weight for backward, and casts the output back to the input's dtype; its
  stand-in does the same.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nemo_automodel.errors import ConfigError, first_line
from nemo_automodel.models.chunked_ce import fused_lm_head_loss, output_layer
from nemo_automodel.models.hf_parallel import hf_model
from nemo_automodel.models.loss import masked_cross_entropy
from nemo_automodel.models.router_aux import router_aux_loss

ACTIVATIONS, LOGITS, BLOCK_GRADS, OTHER_GRADS = range(4)
# where in the step an allocation happens: before the layers, forward of a lower / the top layer,
# output layer + loss (forward and backward, up to the top layer's backward), backward of the top /
# a lower layer (the embeddings' backward counts as the lowest layer's)
PRE, FWD_LOWER, FWD_TOP, HEAD, BWD_TOP, BWD_LOWER = range(6)
_SDPA = F.scaled_dot_product_attention
_FLASH_ATTENTION = 1  # torch.nn.attention.SDPBackend.FLASH_ATTENTION
_GROUPED_MM = torch.ops.aten._grouped_mm.default


@dataclass(frozen=True)
class Timeline:
    """Live bytes by kind after each allocation of a rehearsed forward + backward.

    ``live[i, k]``: bytes of kind ``k`` (ACTIVATIONS, LOGITS, BLOCK_GRADS, OTHER_GRADS) alive right
    after the i-th allocation, which happened in ``region[i]``. Parameters, buffers and optimizer
    state are not included. ``layers`` decoder layers were rehearsed; each keeps
    ``act_per_layer`` bytes for backward and gets ``grad_per_layer`` bytes of gradients.
    """

    live: np.ndarray
    region: np.ndarray
    layers: int
    act_per_layer: float
    grad_per_layer: float

    def extended(self, total_layers: int) -> Timeline:
        """The timeline of the same model with ``total_layers`` identical decoder layers.

        Layers repeat, so the step of the deeper model is this one with more layers' activations
        alive from the top layer's forward until its backward (each extra layer keeps
        ``act_per_layer``), and more layers' gradients alive in the lower layers' backward. Within
        a run of identical layers live memory changes linearly from layer to layer, so its maximum
        is at the top or the bottom one, both of which were rehearsed.
        """
        extra = total_layers - self.layers
        if extra <= 0:
            return self
        delta = np.zeros((6, 4))
        delta[[FWD_TOP, HEAD, BWD_TOP], ACTIVATIONS] = extra * self.act_per_layer
        delta[BWD_LOWER, BLOCK_GRADS] = extra * self.grad_per_layer
        return Timeline(self.live + delta[self.region], self.region, total_layers, self.act_per_layer,
                        self.grad_per_layer)

    def peak(self, block_grad_share: float = 1.0, other_grad_share: float = 1.0) -> np.ndarray:
        """Live bytes by kind at the moment their sum peaks, gradients weighted by the share each
        device keeps (e.g. 1/8 for gradients that FSDP2 reduce-scatters over 8 ranks)."""
        if not len(self.live):
            return np.zeros(4)
        weights = np.array([1.0, 1.0, block_grad_share, other_grad_share])
        return self.live[int(np.argmax(self.live @ weights))] * weights


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages that ops create, until each storage is freed."""

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.kind, self.region = ACTIVATIONS, PRE
        self.totals = [0, 0, 0, 0]
        self.rows: list[tuple[int, ...]] = []
        self.regions: list[int] = []
        self._live: dict[int, list[int]] = {t.untyped_storage()._cdata: [0, ACTIVATIONS] for t in known}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = _on_meta(func, args, kwargs or {})
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = [size, self.kind]
        self.totals[self.kind] += size
        weakref.finalize(storage, self._free, key)
        self.rows.append(tuple(self.totals))
        self.regions.append(self.region)

    def _free(self, key: int) -> None:
        size, kind = self._live.pop(key)
        self.totals[kind] -= size

    def retag(self, t: torch.Tensor, kind: int) -> None:
        """Count ``t``'s storage as ``kind`` from now on (a gradient accumulated into ``.grad``)."""
        entry = self._live.get(t.untyped_storage()._cdata)
        if entry is not None and entry[1] != kind:
            self.totals[entry[1]] -= entry[0]
            self.totals[kind] += entry[0]
            entry[1] = kind


# -- what the meta device would do differently --------------------------------------------------
def _on_meta(func, args: tuple, kwargs: dict) -> Any:
    """Run an aten op on meta tensors as the real device would.

    ``_grouped_mm``, the kernel of transformers' default experts implementation (``grouped_mm``: the
    tokens sorted by expert, one matmul over the jagged groups), has a meta function that accepts
    bf16 only (the CUDA kernel's rule), while the CPU kernel runs fp32 too: a fp32 MoE step could not
    be rehearsed ("Expected inputs of BF16 type"). Its output is shaped in bf16 and handed back in the
    op's own dtype, so the rehearsal keeps the real implementation's tensors: the routed tokens
    (tokens x top-k rows) through each projection and their gradients. ``experts_implementation="eager"``
    would run on meta too, but loops over experts with other temporaries than the real run has.
    """
    if func is _GROUPED_MM and args[0].device.type == "meta" and args[0].dtype != torch.bfloat16:
        dtype = kwargs.get("out_dtype") or args[0].dtype
        cast = [t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
        shaped = func(*cast, **{k: (v.to(torch.bfloat16) if k == "bias" and v is not None else v)
                                for k, v in kwargs.items() if k != "out_dtype"})
        return torch.empty_strided(shaped.shape, shaped.stride(), dtype=dtype, device="meta")
    return func(*args, **kwargs)


def _to(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t.to(dtype) if t is not None and dtype is not None and t.is_floating_point() else t


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The memory behaviour of flash / memory-efficient attention on meta tensors."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # as F.scaled_dot_product_attention does
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
    if v.shape[-1] != q.shape[-1]:  # flash needs one head size; memory-efficient attention keeps v's (e.g. MLA)
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, attn_mask, True, dropout_p, is_causal, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def _cpu_picks_flash(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    """Whether the CPU dispatcher takes its flash kernel for these shapes and dtypes (asked on tiny stand-ins)."""
    def small(t: torch.Tensor) -> torch.Tensor:
        return torch.zeros((*t.shape[:-2], 8, t.shape[-1]), dtype=t.dtype)

    mask = None if attn_mask is None else torch.zeros((*attn_mask.shape[:-2], 8, 8), dtype=attn_mask.dtype)
    return torch._fused_sdp_choice(small(q), small(k), small(v), mask, dropout_p, is_causal, scale=scale,
                                   enable_gqa=enable_gqa) == _FLASH_ATTENTION


def _attention(kernels: str, autocast: torch.dtype | None) -> Callable:
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if q.device.type != "meta":
            return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)
        q, k, v = (_to(t, autocast) for t in (q, k, v))
        args = (q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if kernels == "cpu" and not _cpu_picks_flash(*args):
            return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)
        return _fused_attention(*args)

    return sdpa


def _meta_autocast(autocast: Callable) -> Callable:
    """``torch.autocast`` that is a no-op on meta (which has no autocast: asking for its dtype raises). peft
    folds LoRA factors into fused expert weights under ``torch.autocast(W.device.type, enabled=False)``;
    the emulated autocast (``emulate_autocast``) does not depend on it."""
    def make(device_type: str, *args: Any, **kwargs: Any) -> Any:
        return contextlib.nullcontext() if device_type == "meta" else autocast(device_type, *args, **kwargs)
    return make


def _packed_indices(position_ids: torch.Tensor) -> torch.Tensor:
    """transformers' ``find_packed_sequence_indices`` without its data-dependent "no packing" check."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


@contextlib.contextmanager
def _meta_semantics(kernels: str, autocast: torch.dtype | None, packed: bool = False) -> Iterator[None]:
    """Route attention to fused-kernel memory behaviour and answer transformers' packed-sequence probe."""
    import transformers.masking_utils as masking

    saved = F.scaled_dot_product_attention, getattr(masking, "find_packed_sequence_indices", None), torch.autocast
    F.scaled_dot_product_attention = _attention(kernels, autocast)
    if saved[1] is not None:
        masking.find_packed_sequence_indices = _packed_indices if packed else lambda position_ids: None
    torch.autocast = _meta_autocast(saved[2])  # type: ignore[misc,assignment]  # restored below
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved[0]
        if saved[1] is not None:
            masking.find_packed_sequence_indices = saved[1]
        torch.autocast = saved[2]  # type: ignore[misc]


def emulate_autocast(model: torch.nn.Module, dtype: torch.dtype, skip: AbstractSet[int] = frozenset()) -> None:
    """Make every ``nn.Linear`` of a meta model (but those in ``skip``) compute in ``dtype`` from casts
    of its input, weight and bias, as autocast does for linear layers (the casts are new tensors;
    backward keeps them)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear and id(module) not in skip:
            def forward(x, layer=module):
                return F.linear(_to(x, dtype), _to(layer.weight, dtype), _to(layer.bias, dtype))
            module.forward = forward  # type: ignore[method-assign]  # torch declares Linear.forward a method


class _FourBitMatmul(torch.autograd.Function):
    """bitsandbytes' ``MatMul4Bit``: dequantizes the weight for each product, keeps no activation."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.shape = weight.shape
        return x @ torch.empty(weight.shape, dtype=x.dtype, device=x.device).t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device), None


def emulate_4bit(model: torch.nn.Module, compute: torch.dtype, skip: torch.nn.Module | None = None) -> set[int]:
    """Give every frozen ``nn.Linear`` but ``skip`` (the output layer) the memory behaviour of a
    bitsandbytes 4-bit linear layer computing in ``compute``; returns the ids of those layers."""
    done = set()
    for module in model.modules():
        if type(module) is torch.nn.Linear and module is not skip and not module.weight.requires_grad:
            def forward(x, layer=module):
                out = _FourBitMatmul.apply(x.to(compute), layer.weight)
                return (out if layer.bias is None else out + layer.bias.to(compute)).to(x.dtype)
            module.forward = forward  # type: ignore[method-assign]  # torch declares Linear.forward a method
            done.add(id(module))
    return done


# -- the rehearsal --------------------------------------------------------------------------------
def _loss(model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor, loss_mask: torch.Tensor,
          chunked: bool, router_aux: float, layers: int) -> torch.Tensor:
    """The loss ``HFAutoModelForCausalLM.loss`` computes: masked cross-entropy (or the chunked loss) and, with
    ``router_aux`` > 0, the router load-balancing term over every MoE layer's router logits (the model returns
    them; the family's loss concatenates all of them and builds its one-hot expert masks at once). A model
    rehearsed with fewer than its ``layers`` identical layers repeats the last layer's router logits for the
    missing ones, so the term is the whole model's. The model's outputs die on return, as in the real call."""
    extra = {"output_router_logits": True} if router_aux else {}
    if chunked:
        with fused_lm_head_loss(model, labels, loss_mask) as out:
            outputs = model(**inputs, **extra)
        loss = out["loss"]
    else:
        outputs = model(**inputs, **extra)
        loss = masked_cross_entropy(outputs.logits, labels, loss_mask)
    if router_aux:
        router_logits = tuple(outputs.router_logits)
        router_logits += router_logits[-1:] * max(0, layers - len(router_logits))
        aux = router_aux_loss(hf_model(model), router_logits, {"input_ids": inputs["input_ids"]})
        loss = loss + router_aux * aux * loss_mask.sum()
    return loss


def _first_tensor(value: Any) -> torch.Tensor | None:
    return next((t for t in tree_leaves(value) if isinstance(t, torch.Tensor)), None)


def _model_name(model: torch.nn.Module) -> str:
    """The HF model's class name (a peft wrapper's base model)."""
    return type(hf_model(model)).__name__


def _watch(tracker: _LiveBytes, model: torch.nn.Module, blocks: list[torch.nn.Module],
           head: torch.nn.Module) -> tuple[list, list[int]]:
    """Hooks that keep ``tracker.kind``/``region`` current; returns (handles, activations at each layer's start)."""
    handles, act_at_start, top = [], [0] * len(blocks), len(blocks) - 1
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    for p in model.parameters():
        if p.requires_grad:
            kind = BLOCK_GRADS if id(p) in in_blocks else OTHER_GRADS
            handles.append(p.register_post_accumulate_grad_hook(lambda p, kind=kind: tracker.retag(p.grad, kind)))

    def set_region(region: int, kind: int = ACTIVATIONS) -> Callable:
        def hook(*_) -> None:
            tracker.region, tracker.kind = region, kind
        return hook

    def on_output_grad(out: torch.Tensor | None, region: int) -> None:
        if out is not None and out.requires_grad:
            out.register_hook(set_region(region))

    for i, block in enumerate(blocks):
        def pre(module, args, i=i) -> None:
            if tracker.region < HEAD:  # not a recompute during backward
                tracker.region = FWD_TOP if i == top else FWD_LOWER
                act_at_start[i] = tracker.totals[ACTIVATIONS]

        def post(module, args, output, i=i) -> None:
            if tracker.region < HEAD:  # backward of this layer starts when its output's gradient is ready
                on_output_grad(_first_tensor(output), BWD_TOP if i == top else BWD_LOWER)

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]

    def enter_head(module, args) -> None:
        set_region(HEAD, LOGITS)()
        on_output_grad(_first_tensor(args), HEAD)  # backward leaves the loss: still the head's region

    handles.append(head.register_forward_pre_hook(enter_head))
    return handles, act_at_start


def rehearse_step(model: torch.nn.Module, blocks: list[torch.nn.Module], *, micro_batch_size: int,
                  seq_length: int, packed: bool = False, chunked_loss: bool = False, kernels: str = "cuda",
                  autocast: torch.dtype | None = None, four_bit: torch.dtype | None = None,
                  router_aux: float = 0.0, total_layers: int | None = None) -> Timeline:
    """Forward + loss + backward of one micro-batch of ``micro_batch_size`` rows x ``seq_length`` tokens
    on a meta-device ``model`` (in train mode, adapters and checkpointing already applied).

    ``blocks`` are the decoder layers (their parameters' gradients are counted apart); ``kernels``
    is ``"cuda"`` (flash / memory-efficient attention) or ``"cpu"`` (what the CPU dispatcher picks);
    ``autocast`` emulates bf16 autocast over the model's weights; ``four_bit`` a 4-bit base (frozen
    linear layers but the output layer) computing in that dtype; ``router_aux`` the coefficient of a
    mixture-of-experts model's router load-balancing loss (0: none); ``total_layers`` the layers of the
    whole model when ``blocks`` are fewer identical ones (the load-balancing loss then covers all of them).
    """
    b, s = micro_batch_size, seq_length
    ids = torch.zeros(b, s, dtype=torch.long, device="meta")
    labels, loss_mask = torch.zeros_like(ids), torch.ones(b, s, device="meta")
    head = output_layer(model)
    if head is None:
        raise ConfigError(f"cannot estimate the memory of {_model_name(model)}: it has no output layer")
    skip = emulate_4bit(model, four_bit, skip=head) if four_bit is not None else set()
    if autocast is not None:
        emulate_autocast(model, autocast, skip=skip | ({id(head)} if chunked_loss else set()))
    tracker = _LiveBytes([*model.parameters(), *model.buffers()])
    handles, act_at_start = _watch(tracker, model, blocks, head)
    try:
        with _meta_semantics(kernels, autocast, packed), tracker:
            # as HFAutoModelForCausalLM calls it: position ids, no attention mask (packed rows get theirs
            # from the position ids)
            positions = torch.arange(s, device="meta").expand(b, s)
            loss = _loss(model, dict(input_ids=ids, position_ids=positions, use_cache=False), labels, loss_mask,
                         chunked_loss, router_aux, total_layers or len(blocks))
            tracker.region, tracker.kind = HEAD, LOGITS
            loss.backward()
    except ConfigError:
        raise
    except Exception as err:  # an architecture whose step does not run on meta tensors
        raise ConfigError(f"cannot estimate the memory of {_model_name(model)}: its training step does not run on the meta "
                          f"device ({type(err).__name__}: {first_line(err)})") from None
    finally:
        for handle in handles:
            handle.remove()
    n = len(blocks)
    per_layer = act_at_start[-1] - act_at_start[-2] if n >= 3 else 0.0
    return Timeline(np.array(tracker.rows, dtype=np.float64).reshape(-1, 4), np.array(tracker.regions, dtype=int),
                    n, float(per_layer), tracker.totals[BLOCK_GRADS] / n if n else 0.0)
