"""NeMo-Run's command line, made to fit our recipes: parser patches and checked ``key=value`` overrides.

Importing this module patches NeMo-Run 0.11.1's CLI parser (see below); `apply_overrides`
applies overrides to a copy of a graph with one clear error per bad one. Used by the recipe
files' command line (`recipe_cli`) and the experiment API's sweeps.
"""

# No `from __future__ import annotations` here: NeMo-Run reads annotations at run time.
import copy
import difflib
import inspect
import logging
import types
import typing
from collections.abc import Callable
from typing import Any

import catalogue
import fiddle as fdl
import nemo_run as run
import nemo_run.cli.cli_parser as _cli_parser
import nemo_run.config as _run_config
from nemo_run.cli.cli_parser import parse_cli_args

from nemo_automodel.errors import ConfigError
from nemo_automodel.launch import sweep


# -- NeMo-Run 0.11.1 compatibility ---------------------------------------------------------------
# 1. Its override parser cannot read string annotations (`from __future__ import annotations`,
#    used throughout nemo_automodel) nor `X | None`; it fails with "Unsupported type: int".
# 2. An unannotated argument (api.finetune's ``peft``) never looks up factories, so `peft=lora`
#    would set the string "lora".
# 3. get_type_namespace(<Partial of f>) says "nemo_run.config.f", so factories registered for an
#    argument of ``f`` (``target_arg``) are not found when overriding a recipe graph.
def _to_typing(tp: Any) -> Any:
    """``int | None`` -> ``Optional[int]``, recursively (NeMo-Run only knows typing's forms)."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType):
        return typing.Union[tuple(_to_typing(a) for a in args)]  # noqa: UP007
    origin = typing.get_origin(tp)
    alias: Any = {list: typing.List, dict: typing.Dict, tuple: typing.Tuple}.get(origin)  # noqa: UP006
    if alias is not None and args:
        return alias[tuple(_to_typing(a) for a in args)] if origin is not list else alias[_to_typing(args[0])]
    return tp


_resolve_annotation = _cli_parser._maybe_resolve_annotation
_type_namespace = _run_config.get_type_namespace


def _maybe_resolve_annotation(fn: Any, arg_name: str, annotation: Any) -> Any:
    if annotation is None:
        return Any
    if isinstance(annotation, (str, types.UnionType)):
        target = getattr(fn, "__fn_or_cls__", fn)
        try:
            hints = typing.get_type_hints(inspect.unwrap(target.__init__ if inspect.isclass(target) else target))
            annotation = hints.get(arg_name, annotation)
        except Exception:  # unresolvable names: leave the annotation to NeMo-Run
            pass
    return _resolve_annotation(fn, arg_name, _to_typing(annotation))


def _get_type_namespace(typ: Any) -> str:
    return _type_namespace(typ.__fn_or_cls__ if isinstance(typ, fdl.Buildable) else typ)


_cli_parser._maybe_resolve_annotation = _maybe_resolve_annotation
_run_config.get_type_namespace = _get_type_namespace
logging.getLogger(_cli_parser.__name__).setLevel(logging.CRITICAL)  # we print one line per error ourselves


# -- overrides --------------------------------------------------------------------------------------
_MISSING = object()


def _params(node: fdl.Buildable) -> tuple[list[str], bool]:
    sig = inspect.signature(node.__fn_or_cls__)
    kinds = [p.kind for p in sig.parameters.values()]
    return [n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)], \
        inspect.Parameter.VAR_KEYWORD in kinds


def walk(graph: Any, key: str, check: bool, root: str = "the recipe", prefix: str = "") -> Any:
    """The value at dotted ``key`` (or `_MISSING`); with ``check``, a `ConfigError` naming the bad part."""
    node, parts = graph, key.split(".")
    key = prefix + key
    for i, part in enumerate(parts):
        where = prefix + ".".join(parts[:i]) if i else root
        if not isinstance(node, fdl.Buildable):
            if not check:
                return _MISSING
            raise ConfigError(f"override {key}: {where} is {node!r}, which has no attribute {part!r}"
                              + (f" (set {where}=… first)" if node is None else ""))
        names, var_kw = _params(node)
        if part not in names and not var_kw:
            if not check:
                return _MISSING
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else f"it takes {', '.join(names)}"
            owner = getattr(node.__fn_or_cls__, "__name__", str(node.__fn_or_cls__))
            raise ConfigError(f"override {key}: {where} ({owner}) has no argument {part!r}; {hint}")
        node = getattr(node, part, None)
    return node


def root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return (str(err).splitlines() or [type(err).__name__])[0].split(" (Argument: ")[0]


def apply_overrides(graph: run.Partial, args: list[str]) -> run.Partial:
    """Apply NeMo-Run ``key=value`` overrides to a copy of ``graph``, one clear error per bad one."""
    graph = copy.deepcopy(graph)
    for arg in args:
        if arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r} (see --help)")
        key = arg.split("=", 1)[0].rstrip("+-*/|&")
        if "=" not in arg or not key:
            raise ConfigError(f"override {arg!r} is malformed: use key=value, e.g. trainer.max_steps=5")
        if "[" not in key:
            walk(graph, key, check=True)
        try:
            if not _set_argument_factory(graph, key, arg.split("=", 1)[1]):
                graph = parse_cli_args(graph, [arg])
        except Exception as err:
            raise ConfigError(f"override {arg!r}: {root_cause(err)}") from None
    return graph


def _set_argument_factory(graph: run.Partial, key: str, value: str) -> bool:
    """``trainer.strategy=fsdp2_parallel(tensor_parallel_size=8)``: a factory registered for that argument
    (``@run.cli.factory(target=Trainer, target_arg="strategy")``) builds the value. NeMo-Run looks such a
    factory up only when the annotation admits no ``str``; ``Strategy | str | None`` kept the text instead
    (outside a recipe file that defines the factory). True when set here."""
    parent_key, _, name = key.rpartition(".")
    parent = walk(graph, parent_key, check=True) if parent_key else graph
    factory = value.split("(", 1)[0].strip()
    if not isinstance(parent, fdl.Buildable) or not factory.isidentifier():
        return False
    owner = fdl.get_callable(parent)
    if not catalogue.check_exists(f"{_run_config.get_type_namespace(owner)}.{name}", factory):
        return False
    annotation = inspect.signature(owner).parameters[name].annotation if name in _params(parent)[0] else Any
    setattr(parent, name, _cli_parser.parse_factory(owner, name, annotation, value))
    return True


def executor_args(arg: str) -> list[str]:
    """``executor=X`` -> ``run.executor=X``; ``executor=X(k=v)`` -> ``run.executor=X run.executor.k=v``.

    (NeMo-Run 0.11.1 cuts ``run.executor=local(ntasks_per_node=2)`` at the second ``=``.)
    """
    arg = arg[4:] if arg.startswith("run.executor") else arg
    if not arg.startswith(("executor=", "executor.")):
        return [arg]
    name, _, call = arg.partition("=")[2].partition("(")
    if arg.startswith("executor.") or not call or call == ")":
        return ["run." + arg.removesuffix("()")]
    if not call.endswith(")"):
        raise ConfigError(f"{arg!r} is malformed: use executor=NAME(key=value, ...)")
    return [f"run.executor={name}"] + [f"run.executor.{kv}" for kv in sweep.split_list(f"[{call[:-1]}]", arg)]


def factory_names(fn: Callable) -> list[str]:
    ns = _type_namespace(fn)
    return sorted(k[-1] for k in catalogue.REGISTRY if len(k) == 2 and k[0] == ns and k[-1] != "default")
