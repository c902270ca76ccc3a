"""Expert parallel: a mixture-of-experts model's routed experts split over an ``ep`` mesh, with transformers'
own primitives (``transformers.distributed.expert_parallel``).

The model names its experts (``contracts.ExpertParallelPlan``, from ``config.base_model_ep_plan``): the stacked
expert weights become ``Shard(0)`` DTensors on ``ep`` (each rank keeps ``num_experts / E`` whole experts), and the
experts module's forward sends every (token, expert) pair to the expert's rank and back with two autograd
all-to-alls (transformers' ``AllToAllEP``; with TP, the ranks of a tp group split their shared batch first, so
no token runs twice). ``FSDP2Strategy`` then shards each experts module over ``efsdp`` (the ranks holding the
same experts) before the dense blocks over ``dp``; ``gradient_divide_factor`` makes the expert gradients the
same mean over all data-parallel tokens the dense ones are. The weights stay DTensors, so DCP reshards a
checkpoint onto any E, or one process.

transformers is used rather than torch's primitives alone because it already knows every family's expert layout
(fused ``gate_up_proj``, GPT-OSS biases, DeepSeek's shared experts left dense) and its dispatch is the one its
models are tested with. A LoRA adapter on the routed experts is refused under EP: peft keeps one pair of
low-rank factors for all experts of a layer, interleaved by expert in ``lora_B``, which no ``Shard`` of the
expert dim describes.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from nemo_automodel.contracts import ExpertParallelPlan
from nemo_automodel.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

DISPATCH = "ep_dispatch_experts"  # the style of the experts module itself (its weights are "grouped_gemm")


def _matcher(pattern: str) -> re.Pattern:
    # "*" stands for one name atom, as in transformers' plans
    return re.compile(r"\.".join("[^.]+" if a == "*" else re.escape(a) for a in pattern.split(".")))


def concrete_expert_plan(plan: ExpertParallelPlan, ep_size: int) -> dict[str, str]:
    """Module or parameter name (in ``plan.root``) -> style; one-line ConfigError for a dense model, an expert
    count E does not divide, a plan that matches nothing, or experts a LoRA adapter wraps."""
    if not plan.styles:
        raise ConfigError(f"expert_parallel_size={ep_size}: {plan.model} has no routed experts to split "
                          f"({plan.source}: none); use expert_parallel_size=1")
    if plan.num_experts is not None and plan.num_experts % ep_size:
        raise ConfigError(f"expert_parallel_size={ep_size} does not divide the {plan.num_experts} routed experts of "
                          f"{plan.model}: use a size that divides it")
    patterns = [(_matcher(p), s) for p, s in plan.styles.items()]
    # the weights first: the dispatch reads the experts module's local expert count, which sharding them sets
    names = [n for n, _ in plan.root.named_parameters()] + [n for n, _ in plan.root.named_modules()]
    concrete = {n: s for n in names for m, s in patterns if m.fullmatch(n)}
    if DISPATCH not in concrete.values():
        raise ConfigError(f"expert_parallel_size={ep_size}: {plan.source} {sorted(plan.styles)} matches no experts "
                          f"module of {plan.model}")
    for name, style in concrete.items():
        adapted = _adapted_parameters(plan.root.get_submodule(name)) if style == DISPATCH else []
        if adapted:
            raise ConfigError(
                f"expert_parallel_size={ep_size} cannot split {plan.model}'s routed experts while LoRA adapts them "
                f"({name}: {', '.join(adapted)}): peft keeps one pair of low-rank factors per layer for all experts, "
                "interleaved by expert, which cannot be split by expert; leave the experts out of the LoRA targets "
                "(e.g. LoRA(target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']) adapts attention only) or "
                "use expert_parallel_size=1")
    return concrete


def _adapted_parameters(module: torch.nn.Module) -> list[str]:
    """The parameters a peft ``ParamWrapper`` (``target_parameters``) adapts at ``module``, outermost first."""
    adapted = []
    while isinstance(base := getattr(module, "base_layer", None), torch.nn.Module) and hasattr(module, "parameter_name"):
        adapted.append(str(module.parameter_name))
        module = base
    return adapted


def apply_expert_parallel(plan: ExpertParallelPlan, ep_mesh: DeviceMesh, tp_mesh: DeviceMesh) -> list[torch.nn.Module]:
    """Split ``plan.root``'s routed experts over ``ep_mesh`` in place (``tp_mesh``: the ranks that share one batch,
    size 1 without TP); returns the experts modules, for FSDP to shard over ``efsdp``."""
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    concrete = concrete_expert_plan(plan, ep_mesh.size())
    apply_expert_parallelism(plan.root, ep_mesh, tp_mesh, concrete)
    return [plan.root.get_submodule(n) for n, s in concrete.items() if s == DISPATCH]


def tensor_parallel_styles_outside(styles: dict[str, str], plan: ExpertParallelPlan) -> dict[str, str]:
    """A tensor-parallel plan without its rules for the experts (and their weights), which EP shards instead,
    as transformers does when both apply."""
    experts = [p for p, s in (plan.styles or {}).items() if s == DISPATCH]
    return {p: s for p, s in styles.items() if not any(p == e or p.startswith(e + ".") for e in experts)}
