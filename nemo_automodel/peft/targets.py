"""Resolve LoRA target patterns to what LoRA can adapt in a loaded model: its linear layers, and the fused
expert weights of mixture-of-experts families (3-D ``nn.Parameter``s such as ``mlp.experts.gate_up_proj``
[experts, out, in] in transformers 5), which peft adapts through ``target_parameters``.

A pattern is one of:
- a Megatron-style alias (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``),
  mapped to the architecture's own layers (q/k/v_proj, fused qkv_proj, GPT-2's c_attn, DeepSeek's latent
  attention q_a/q_b/kv_a/kv_b projections, ...);
- a wildcard (``*_proj``, ``model.layers.0.*``): ``*`` matches anything, ``.`` is literal;
- a regex (contains ``^$[]()+?|{}\\``), matched against the full name;
- a plain name (``q_proj``): the full name or its dotted suffix.

A fused expert weight matches by its own full name (``*_proj`` reaches ``...experts.gate_up_proj``) or by the
module holding it (``experts``). Layers peft refuses in a family (a Mamba mixer's ``out_proj``/``conv1d``)
are left out of a pattern that also reaches others, with one warning line; a pattern that reaches only
those is refused in one line.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from nemo_automodel.errors import ConfigError

log = logging.getLogger(__name__)

MEGATRON_ALIASES = {
    # DeepSeek's multi-head latent attention projects q and kv down then up: q_a/q_b, kv_a_proj_with_mqa/kv_b
    "linear_qkv": r".*\.(q_proj|k_proj|v_proj|qkv_proj|c_attn|query_key_value|Wqkv|W_pack|q_a_proj|q_b_proj|"
                  r"kv_a_proj_with_mqa|kv_b_proj)",
    "linear_proj": r".*(attn|attention)[^.]*\.(o_proj|c_proj|out_proj|dense)",
    "linear_fc1": r".*\.(gate_proj|up_proj|gate_up_proj|c_fc|fc1|dense_h_to_4h|w1|w3)",
    "linear_fc2": r".*(mlp|feed_forward|ffn|experts)[^.]*\.(down_proj|c_proj|fc2|dense_4h_to_h|w2)",
}
_REGEX_CHARS = set("^$[]()+?|{}\\")


def _is_adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def candidate_names(model: torch.nn.Module) -> list[str]:
    """Fully qualified names of the layers LoRA can adapt (Linear, GPT-2 Conv1D)."""
    return [name for name, mod in model.named_modules() if name and _is_adaptable(mod)]


def candidate_parameters(model: torch.nn.Module) -> list[str]:
    """Full names of the fused expert weights: 3-D parameters held directly by a model's own module (not by a
    torch layer such as a Mamba mixer's ``Conv1d``)."""
    return [f"{name}.{pname}" for name, mod in model.named_modules()
            if name and not _is_adaptable(mod) and not type(mod).__module__.startswith("torch.")
            for pname, param in mod.named_parameters(recurse=False) if param.dim() == 3]


def pattern_matcher(pattern: str) -> Callable[[str], bool]:
    """Return ``match(full_name) -> bool`` for one pattern."""
    if pattern in MEGATRON_ALIASES:
        rx = re.compile(MEGATRON_ALIASES[pattern])
        return lambda name: rx.fullmatch(name) is not None
    if any(c in _REGEX_CHARS for c in pattern):
        rx = re.compile(pattern)
        return lambda name: rx.fullmatch(name) is not None
    if "*" in pattern:
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    return lambda name: name == pattern or name.endswith("." + pattern)


def _matches_parameter(match: Callable[[str], bool], name: str) -> bool:
    return match(name) or match(name.rpartition(".")[0])


def peft_refuses(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Layer name -> why peft refuses LoRA on it in ``model``, asked of peft's own check once per layer name
    (today: a Mamba mixer's ``out_proj``/``conv1d`` in the Mamba families)."""
    try:  # a private peft check, pinned with peft; without it nothing is pre-refused and peft raises itself
        from peft import LoraConfig
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    except ImportError:
        return {}
    config, why = LoraConfig(), {}
    for leaf in dict.fromkeys(n.rpartition(".")[2] for n in names):
        try:
            _check_lora_target_modules_mamba(config, model, leaf)
        except ValueError:
            why[leaf] = f"peft cannot adapt {leaf} in {getattr(model.config, 'model_type', '?')} models"
    return {n: why[leaf] for n in names if (leaf := n.rpartition(".")[2]) in why}


def summarize(names: Iterable[str], limit: int = 12) -> str:
    """Collapse layer indices (``layers.3.`` -> ``layers.*.``) so candidate lists stay short."""
    shapes = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))
    more = f", ... (+{len(shapes) - limit} more)" if len(shapes) > limit else ""
    return ", ".join(shapes[:limit]) + more


def _candidates(model: torch.nn.Module, within: Iterable[str] | None) -> tuple[list[str], list[str]]:
    """(layers, fused expert weights) of ``model`` under the module prefixes ``within`` (all when None)."""
    layers, weights = candidate_names(model), candidate_parameters(model)
    if within is None:
        return layers, weights
    scope = tuple(within)

    def inside(names: list[str]) -> list[str]:
        return [n for n in names if any(n == p or n.startswith(p + ".") for p in scope)]

    return inside(layers), inside(weights)


@dataclass(frozen=True)
class Targets:
    """What a set of patterns selects: layers (peft ``target_modules``) and fused expert weights (peft
    ``target_parameters``), by full name."""

    modules: list[str]
    parameters: list[str]


def resolve_targets(model: torch.nn.Module, target_modules: Iterable[str], exclude_modules: Iterable[str] = (),
                    within: Iterable[str] | None = None) -> Targets:
    """The layers and fused expert weights selected by ``target_modules`` minus ``exclude_modules``, among
    those under the module prefixes ``within`` (all when None: a VLM passes its language model).

    Raises ConfigError (listing the candidates) when nothing is selected, or when a pattern reaches only
    layers peft refuses in this family; a single pattern that matches nothing while others do only warns,
    so one list serves several architectures.
    """
    layers, weights = _candidates(model, within)
    targets, excludes = list(target_modules), list(exclude_modules)
    family = type(model).__name__
    refusals = peft_refuses(model, layers)
    modules: dict[str, None] = {}
    parameters: dict[str, None] = {}
    for pattern in targets:
        match = pattern_matcher(pattern)
        hits = [n for n in layers if match(n)]
        refused = {n: refusals[n] for n in hits if n in refusals}
        params = [n for n in weights if _matches_parameter(match, n)]
        if refused and len(refused) == len(hits) and not params:
            raise ConfigError(f"LoRA target {pattern!r} reaches only {summarize(refused)} of {family}, and "
                              f"{next(iter(refused.values()))}: target other layers (e.g. in_proj)")
        if refused:
            log.warning("LoRA target %r leaves out %s of %s: %s", pattern, summarize(refused), family,
                        next(iter(refused.values())))
        if not hits and not params:
            log.warning("LoRA target %r matches no layer of %s", pattern, family)
        modules.update(dict.fromkeys(n for n in hits if n not in refused))
        parameters.update(dict.fromkeys(params))
    for pattern in excludes:
        match = pattern_matcher(pattern)
        modules = {n: None for n in modules if not match(n)}
        parameters = {n: None for n in parameters if not _matches_parameter(match, n)}
    if not modules and not parameters:
        where = "" if within is None else f" under {', '.join(within)}"
        raise ConfigError(f"LoRA target_modules={targets} (exclude_modules={excludes}) match no layer of "
                          f"{family}{where}; candidates: {summarize(layers + weights)}")
    return Targets(list(modules), list(parameters))


def resolve_target_modules(model: torch.nn.Module, target_modules: Iterable[str],
                           exclude_modules: Iterable[str] = (), within: Iterable[str] | None = None) -> list[str]:
    """The layers (``Targets.modules``) that ``resolve_targets`` selects."""
    return resolve_targets(model, target_modules, exclude_modules, within).modules


KINDS = ("attention", "MLP", "shared experts", "experts", "SSM", "other")


def kind_of(model: torch.nn.Module, name: str) -> str:
    """What a selected layer or fused weight belongs to, from the class of the module holding it: attention,
    MLP, shared experts, experts (fused weights), SSM (a Mamba mixer) or other."""
    holder = model.get_submodule(name.rpartition(".")[0])
    owner = type(holder).__name__.lower()
    if holder is model or hasattr(holder, "get_output_embeddings"):  # the output layer, not a block's
        return "other"
    if "mamba" in owner or "mixer" in owner and "attention" not in owner:
        return "SSM"
    if "attention" in owner or "attn" in owner:
        return "attention"
    if "shared_expert" in name:
        return "shared experts"
    if "experts" in owner or "expert" in name:
        return "experts"
    if "mlp" in owner or "feedforward" in owner or "ffn" in owner:
        return "MLP"
    return "other"


def describe_targets(model: torch.nn.Module, chosen: Targets, within: Iterable[str] | None = None) -> list[str]:
    """One line per kind of the model's adaptable layers and fused weights: how many of them are adapted, and
    which (``attention: 8 of 8 layers (q_proj, k_proj, v_proj, o_proj)``), so a user sees at once what trains."""
    layers, weights = _candidates(model, within)
    picked = set(chosen.modules) | set(chosen.parameters)
    lines = []
    for kind in KINDS:
        for what, names in (("layers", layers), ("fused weights", weights)):
            of_kind = [n for n in names if kind_of(model, n) == kind]
            if not of_kind or kind == "other" and not picked.intersection(of_kind):
                continue
            adapted = [n for n in of_kind if n in picked]
            leaves = ", ".join(dict.fromkeys(n.rpartition(".")[2] for n in adapted))
            lines.append(f"{kind}: {len(adapted)} of {len(of_kind)} {what}" + (f" ({leaves})" if leaves else ""))
    return lines
