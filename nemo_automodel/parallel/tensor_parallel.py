"""Tensor parallel on a ``tp`` device mesh: the model's own plan (``contracts.TensorParallelPlan``, which the model
gives), LoRA layers sharded per part, and the gradient norm over parameters that live on different meshes.

A plan maps module patterns (relative to the plan's ``root``, e.g. ``LlamaModel``; ``*`` one name atom) to
``"colwise"``/``"rowwise"``; a user's ``FSDP2Strategy(tp_plan=...)`` replaces the model's. Only those two
styles are used: ``ColwiseParallel``/``RowwiseParallel`` return plain local tensors, so the attention reshapes
(``view(..., -1, head_dim)``) see the local heads. LoRA is applied before TP, and a peft LoRA layer is planned
per part (``peft.lora.tensor_parallel_parts``), so the sums equal one process.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from nemo_automodel.contracts import TensorParallelPlan
from nemo_automodel.errors import ConfigError
from nemo_automodel.peft.lora import tensor_parallel_parts

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

STYLES = ("colwise", "rowwise")


def resolve_plan(plan: TensorParallelPlan, override: dict[str, str] | None = None) -> dict[str, str]:
    """The styles to apply: ``override`` (the user's ``tp_plan``) or the model's own; one-line ConfigError
    when there is none, or for a style other than colwise/rowwise."""
    if override is not None:
        styles, source = dict(override), "tp_plan"
    elif plan.styles:
        styles, source = dict(plan.styles), plan.source
    else:
        raise ConfigError(f"{plan.model} has no tensor-parallel plan ({plan.source}: none): pass "
                          "FSDP2Strategy(tp_plan={'layers.*.self_attn.q_proj': 'colwise', ...}) or use "
                          "tensor_parallel_size=1")
    bad = {p: s for p, s in styles.items() if s not in STYLES}
    if bad:
        pattern, style = next(iter(bad.items()))
        raise ConfigError(f"{source} uses the style {style!r} ({pattern}) that FSDP2Strategy cannot apply: only "
                          f"'colwise'/'rowwise' are supported; pass tp_plan={{pattern: 'colwise'|'rowwise'}} to "
                          "override the plan")
    return styles


def _matcher(pattern: str) -> re.Pattern:
    # "*" stands for one name atom, as in transformers' and torch's plans
    return re.compile("^" + r"\.".join(".+?" if a == "*" else re.escape(a).replace(r"\*", "[^.]*")
                                       for a in pattern.split(".")) + "$")


def concrete_plan(root: torch.nn.Module, styles: dict[str, str], tp_size: int) -> dict[str, str]:
    """Module name (in ``root``) -> style, with peft LoRA layers split into their sharded parts.

    Raises a one-line ConfigError for a plan that matches nothing, DoRA layers, or shards that do not
    divide evenly."""
    patterns = [(_matcher(p), p, s) for p, s in styles.items()]
    out: dict[str, str] = {}
    for name, mod in root.named_modules():
        style = next((s for m, _, s in patterns if m.match(name)), None)
        if style is None:
            continue
        parts = tensor_parallel_parts(name, mod, style)
        _check_divisible(name, mod.get_submodule("base_layer") if parts else mod, style, tp_size)
        out.update(dict.fromkeys(parts or [name], style))
    if not out:
        raise ConfigError(f"the tensor-parallel plan {sorted(styles)} matches no module of "
                          f"{type(root).__name__}: check the patterns (relative to the decoder stack)")
    return out


def _check_divisible(name: str, mod: torch.nn.Module, style: str, tp_size: int) -> None:
    if not isinstance(mod, torch.nn.Linear):
        raise ConfigError(f"tensor-parallel plan: {name} is a {type(mod).__name__}, not a Linear; only Linear "
                          "layers can be 'colwise'/'rowwise'")
    size = mod.out_features if style == "colwise" else mod.in_features
    if size % tp_size:
        raise ConfigError(f"tensor_parallel_size={tp_size} does not divide {name} ({style}: {size} features)")


def check_divisors(plan: TensorParallelPlan, tp_size: int) -> None:
    """The sizes the model says TP must divide (attention heads: query and key/value) divide evenly."""
    for field, size in plan.divisible.items():
        if size % tp_size:
            raise ConfigError(f"tensor_parallel_size={tp_size} does not divide {field}={size} of "
                              f"{plan.model}: use a size that divides it")


def apply_tensor_parallel(plan: TensorParallelPlan, tp_mesh: DeviceMesh, override: dict[str, str] | None = None) -> dict[str, str]:
    """Shard the planned layers of ``plan.root`` over ``tp_mesh`` in place; returns the concrete plan applied."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp_size = tp_mesh.size()
    styles = resolve_plan(plan, override)
    check_divisors(plan, tp_size)
    concrete = concrete_plan(plan.root, styles, tp_size)
    kinds = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    parallelize_module(plan.root, tp_mesh, {name: kinds[s]() for name, s in concrete.items()})
    return concrete


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
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
