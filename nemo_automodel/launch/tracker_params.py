"""A recipe graph's configuration as tracker params: ``{"peft.dim": 8, "trainer.max_steps": 100, …}``.

The trainer sees only built objects, so the graph is flattened here, where graphs are launched
(`nemo_automodel.launch.guard.run_graph`, `Experiment.add`, and through them the recipe CLI), and
stored on the graph's ``log`` node as ``NeMoLogger(params=...)``. Only graphs whose log node has a
tracker (``log.wandb`` / ``log.mlflow``) are touched, so a plain graph prints and serializes as before.
"""

from __future__ import annotations

import copy
import inspect
import json
from typing import Any

import fiddle as fdl

SKIPPED = ("log.params", "log.wandb", "log.mlflow")  # the params themselves; tracker settings (URIs may hold secrets)
VALUE_MAX = 500  # a non-plain value (a Dataset object, a callable) is recorded as a short repr


def flatten_graph(graph: fdl.Buildable) -> dict[str, Any]:
    """Every argument of every node, set or defaulted, under its dotted path; a node's target under
    ``<path>._target_``. Plain values (str, numbers, bools, None, lists of them) are kept, others
    become a short ``str``."""
    out: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if key in SKIPPED:
            return
        if isinstance(value, fdl.Buildable):
            if key:
                out[f"{key}._target_"] = _qualname(value.__fn_or_cls__)
            for name, arg in _arguments(value).items():
                walk(arg, f"{key}.{name}" if key else name)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, fdl.Buildable) for v in value):
            for i, item in enumerate(value):
                walk(item, f"{key}.{i}")
        elif isinstance(value, dict) and any(isinstance(v, fdl.Buildable) for v in value.values()):
            for name, item in value.items():
                walk(item, f"{key}.{name}")
        else:
            out[key] = _plain(value)

    walk(graph, "")
    return out


def with_tracker_params(graph: Any) -> Any:
    """``graph``, or a copy whose ``log`` node records `flatten_graph` as ``params`` (explicit
    ``log.params`` entries win) when the log node has a tracker. Called on every graph we launch."""
    log = getattr(graph, "log", None) if isinstance(graph, fdl.Buildable) else None
    if not isinstance(log, fdl.Buildable) or all(getattr(log, t, None) is None for t in ("wandb", "mlflow")):
        return graph
    graph = copy.deepcopy(graph)
    given = getattr(graph.log, "params", None)
    graph.log.params = {**flatten_graph(graph), **(dict(given) if isinstance(given, dict) else {})}
    return graph


def _arguments(node: fdl.Buildable) -> dict[str, Any]:
    """The node's arguments in signature order, defaults filled in for those not set."""
    args = dict(node.__arguments__)
    try:
        params = inspect.signature(node.__fn_or_cls__).parameters
    except (TypeError, ValueError):
        return args
    full = {}
    for name, p in params.items():
        if name in args:
            full[name] = args.pop(name)
        elif p.default is not inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            full[name] = p.default
    return {**full, **args}  # **kwargs-style extras last


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        if all(v is None or isinstance(v, (bool, int, float, str)) for v in items):
            return items
    if isinstance(value, dict):
        try:
            json.dumps(value)
            return dict(value)
        except (TypeError, ValueError):
            pass
    text = _qualname(value) if inspect.isclass(value) or inspect.isfunction(value) else str(value)
    return text if len(text) <= VALUE_MAX else text[:VALUE_MAX - 3] + "..."
