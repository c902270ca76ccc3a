"""Tensor parallel for HF models on a ``tp`` device mesh: the model's own transformers TP plan, LoRA on it,
and the gradient norm over parameters that live on different meshes.

The plan comes from ``model.config.base_model_tp_plan`` (``{"layers.*.self_attn.q_proj": "colwise", ...}``,
patterns relative to the decoder stack, e.g. ``LlamaModel``) or from the user's ``tp_plan`` with the same
form. Only ``"colwise"`` and ``"rowwise"`` are used; ``ColwiseParallel``/``RowwiseParallel`` return plain
local tensors, so the attention reshapes (``view(..., -1, head_dim)``) see the local heads.

peft LoRA layers are planned per part (LoRA is applied before TP): a colwise layer shards ``base_layer``
and ``lora_B.default`` colwise (``lora_A`` replicated), a rowwise layer shards ``base_layer`` and
``lora_A.default`` rowwise (``lora_B`` replicated). Each rank's LoRA output then has the shape of its
base output, and the sums equal one process.
"""

from __future__ import annotations

import math
import re

import torch

from nemo_automodel.errors import ConfigError

STYLES = ("colwise", "rowwise")


def model_tp_plan(model: torch.nn.Module, override: dict[str, str] | None = None) -> dict[str, str]:
    """The TP plan (pattern -> "colwise"|"rowwise") for ``model`` (a HF model, maybe inside peft).

    ``override`` replaces the model's plan; styles other than colwise/rowwise are refused in one line."""
    hf = _hf_model(model)
    name = type(hf).__name__
    if override is not None:
        plan, source = dict(override), "tp_plan"
    else:
        plan = getattr(getattr(hf, "config", None), "base_model_tp_plan", None)
        source = f"{name}'s base_model_tp_plan"
        if not plan:
            raise ConfigError(f"{name} has no tensor-parallel plan (config.base_model_tp_plan): pass "
                              "FSDP2Strategy(tp_plan={'layers.*.self_attn.q_proj': 'colwise', ...}) or use "
                              "tensor_parallel_size=1")
    bad = {p: s for p, s in plan.items() if s not in STYLES}
    if bad:
        pattern, style = next(iter(bad.items()))
        raise ConfigError(f"{source} uses the style {style!r} ({pattern}) that FSDP2Strategy cannot apply: only "
                          f"'colwise'/'rowwise' are supported; pass tp_plan={{pattern: 'colwise'|'rowwise'}} to "
                          "override the plan")
    return plan


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_stack(model: torch.nn.Module) -> torch.nn.Module:
    """The module the plan's patterns are relative to (``LlamaModel`` in ``LlamaForCausalLM``)."""
    hf = _hf_model(model)
    return getattr(hf, "base_model", hf)


def _matcher(pattern: str) -> re.Pattern:
    # "*" stands for one name atom, as in transformers' and torch's plans
    return re.compile("^" + r"\.".join(".+?" if a == "*" else re.escape(a).replace(r"\*", "[^.]*")
                                       for a in pattern.split(".")) + "$")


def concrete_plan(stack: torch.nn.Module, plan: dict[str, str], tp_size: int) -> dict[str, str]:
    """Module name (in ``stack``) -> style, with peft LoRA layers split into their sharded parts.

    Raises a one-line ConfigError for a plan that matches nothing, DoRA layers, or shards that do not
    divide evenly."""
    patterns = [(_matcher(p), p, s) for p, s in plan.items()]
    out: dict[str, str] = {}
    used = set()
    for name, mod in stack.named_modules():
        hit = next(((p, s) for m, p, s in patterns if m.match(name)), None)
        if hit is None:
            continue
        used.add(hit[0])
        style = hit[1]
        if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):  # a peft LoRA layer
            if getattr(mod, "lora_magnitude_vector", None):
                raise ConfigError(f"DoRA cannot be tensor-parallel ({name}): use LoRA or tensor_parallel_size=1")
            base = mod.base_layer
            _check_divisible(name, base, style, tp_size)
            out[f"{name}.base_layer"] = style
            for adapter in mod.lora_A:
                out[f"{name}.{'lora_B' if style == 'colwise' else 'lora_A'}.{adapter}"] = style
        else:
            _check_divisible(name, mod, style, tp_size)
            out[name] = style
    if not out:
        raise ConfigError(f"the tensor-parallel plan {sorted(plan)} matches no module of "
                          f"{type(stack).__name__}: check the patterns (relative to the decoder stack)")
    return out


def _check_divisible(name: str, mod: torch.nn.Module, style: str, tp_size: int) -> None:
    if not isinstance(mod, torch.nn.Linear):
        raise ConfigError(f"tensor-parallel plan: {name} is a {type(mod).__name__}, not a Linear; only Linear "
                          "layers can be 'colwise'/'rowwise'")
    size = mod.out_features if style == "colwise" else mod.in_features
    if size % tp_size:
        raise ConfigError(f"tensor_parallel_size={tp_size} does not divide {name} ({style}: {size} features)")


def check_heads(model: torch.nn.Module, tp_size: int) -> None:
    """Attention heads (query and key/value) must split evenly over the TP ranks."""
    cfg = getattr(_hf_model(model), "config", None)
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(cfg, field, None)
        if isinstance(heads, int) and heads % tp_size:
            raise ConfigError(f"tensor_parallel_size={tp_size} does not divide {field}={heads} of "
                              f"{type(_hf_model(model)).__name__}: use a size that divides it")


def apply_tensor_parallel(model: torch.nn.Module, tp_mesh, plan: dict[str, str]) -> dict[str, str]:
    """Shard ``model``'s planned layers over ``tp_mesh`` in place; returns the concrete plan applied."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp_size = tp_mesh.size()
    check_heads(model, tp_size)
    stack = decoder_stack(model)
    concrete = concrete_plan(stack, plan, tp_size)
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    parallelize_module(stack, tp_mesh, {name: styles[s]() for name, s in concrete.items()})
    return concrete


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` for gradients that are plain tensors and DTensors on several meshes (TP
    shards on ``tp``, FSDP shards on ``dp`` or ``(dp, tp)``): one reduction per (mesh, placements)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    groups: dict[tuple, list[torch.Tensor]] = {}
    plain: list[torch.Tensor] = []
    for g in grads:
        if isinstance(g, DTensor):
            if any(p.is_partial() for p in g.placements):
                g = g.redistribute(g.device_mesh, [Replicate()] * g.device_mesh.ndim)
            groups.setdefault((g.device_mesh, tuple(g.placements)), []).append(g.to_local())
        else:
            plain.append(g)
    device = grads[0].device if not isinstance(grads[0], DTensor) else grads[0].to_local().device
    total = torch.zeros((), dtype=torch.float64, device=device)
    if plain:
        total += sum(g.detach().double().pow(2).sum() for g in plain)
    for (mesh, placements), local in groups.items():
        sq = sum(t.detach().double().pow(2).sum() for t in local)
        sq = sq if isinstance(sq, torch.Tensor) else torch.zeros((), dtype=torch.float64, device=device)
        parts = [Replicate() if p.is_replicate() else Partial() for p in placements]  # any shard (also _StridedShard)
        total += DTensor.from_local(sq.to(device), mesh, parts, run_check=False).full_tensor()
    norm = total.sqrt()
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0 and math.isfinite(coef):
        for g in grads:
            g.detach().mul_(coef)
    return norm.float()
