"""Resolve LoRA target patterns to the fully qualified linear layers of a loaded model.

A pattern is one of:
- a Megatron-style alias (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``),
  mapped to the architecture's own layers (q/k/v_proj, fused qkv_proj, GPT-2's c_attn, ...);
- a wildcard (``*_proj``, ``model.layers.0.*``): ``*`` matches anything, ``.`` is literal;
- a regex (contains ``^$[]()+?|{}\\``), matched against the full name;
- a plain name (``q_proj``): the full name or its dotted suffix.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable

import torch

from nemo_automodel.errors import ConfigError

log = logging.getLogger(__name__)

MEGATRON_ALIASES = {
    "linear_qkv": r".*\.(q_proj|k_proj|v_proj|qkv_proj|c_attn|query_key_value|Wqkv|W_pack)",
    "linear_proj": r".*(attn|attention)[^.]*\.(o_proj|c_proj|out_proj|dense)",
    "linear_fc1": r".*\.(gate_proj|up_proj|gate_up_proj|c_fc|fc1|dense_h_to_4h|w1|w3)",
    "linear_fc2": r".*(mlp|feed_forward|ffn)[^.]*\.(down_proj|c_proj|fc2|dense_4h_to_h|w2)",
}
_REGEX_CHARS = set("^$[]()+?|{}\\")


def _is_adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def candidate_names(model: torch.nn.Module) -> list[str]:
    """Fully qualified names of the layers LoRA can adapt (Linear, GPT-2 Conv1D)."""
    return [name for name, mod in model.named_modules() if name and _is_adaptable(mod)]


def pattern_matcher(pattern: str):
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


def summarize(names: Iterable[str], limit: int = 12) -> str:
    """Collapse layer indices (``layers.3.`` -> ``layers.*.``) so candidate lists stay short."""
    shapes = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))
    more = f", ... (+{len(shapes) - limit} more)" if len(shapes) > limit else ""
    return ", ".join(shapes[:limit]) + more


def resolve_target_modules(model: torch.nn.Module, target_modules: Iterable[str],
                           exclude_modules: Iterable[str] = (), within: Iterable[str] | None = None) -> list[str]:
    """Full names of the layers selected by ``target_modules`` minus ``exclude_modules``, among the layers
    under the module prefixes ``within`` (all layers when None: a VLM passes its language model).

    Raises ConfigError (listing the candidates) when nothing is selected; a single pattern that
    matches nothing while others do only warns, so one list serves several architectures.
    """
    names = candidate_names(model)
    if within is not None:
        scope = tuple(within)
        names = [n for n in names if any(n == p or n.startswith(p + ".") for p in scope)]
    targets, excludes = list(target_modules), list(exclude_modules)
    selected: dict[str, None] = {}
    for pattern in targets:
        hits = [n for n in names if pattern_matcher(pattern)(n)]
        if not hits:
            log.warning("LoRA target %r matches no layer of %s", pattern, type(model).__name__)
        selected.update(dict.fromkeys(hits))
    for pattern in excludes:
        match = pattern_matcher(pattern)
        selected = {n: None for n in selected if not match(n)}
    if not selected:
        where = "" if within is None else f" under {', '.join(scope)}"
        raise ConfigError(f"LoRA target_modules={targets} (exclude_modules={excludes}) match no layer of "
                          f"{type(model).__name__}{where}; candidates: {summarize(names)}")
    return list(selected)
