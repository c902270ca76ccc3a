"""Recipe files on the command line: NeMo-Run's override syntax, executors, sweeps, honest exit codes.

    python recipes/smollm2_135m.py trainer.max_steps=5 --yes                   # in this process
    python recipes/smollm2_135m.py peft=None optim.optimizer_fn.lr=5e-5 --dryrun  # print the graph
    python recipes/smollm2_135m.py executor=local executor.ntasks_per_node=2 trainer.strategy=ddp --yes
    python recipes/smollm2_135m.py executor=slurm executor.nodes=2 --dryrun    # + the sbatch script
    python recipes/smollm2_135m.py optim.optimizer_fn.lr=[1e-4,3e-4] peft.dim=[8,16] --yes  # 4 runs
    nemo automodel finetune --factory smollm2_135m trainer.max_steps=5 --yes    # same, via `nemo`

``executor=NAME`` / ``executor.KEY=V`` are accepted as aliases of NeMo-Run's ``run.executor=…``.
Sweeps run as one experiment (sequentially; ``run.sequential=False`` for parallel) on the given
executor, or `executors.local` if none (``--direct``: one after another in this process), and end
with a table of final metrics (also written to ``run.summary=PATH``, default
``<log_dir>/<experiment id>_summary.md``). ``--dryrun`` lists the tasks (and prints each
executor request, e.g. the sbatch script). ``--detach`` returns once Slurm jobs are submitted.
Exit codes: 0 success, 1 a job failed (its log tail is printed), 2 bad input (one line on stderr).
"""

# No `from __future__ import annotations` here: NeMo-Run reads the RunContext fields' annotations.
import copy
import difflib
import inspect
import logging
import sys
import traceback
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import catalogue
import fiddle as fdl
import nemo_run as run
import nemo_run.cli.cli_parser as _cli_parser
import nemo_run.config as _run_config
from nemo_run.cli.api import RunContext, _parse_prefixed_args, _serialize_configuration
from nemo_run.cli.cli_parser import parse_cli_args

import executors
from nemo_automodel import api, sweep
from nemo_automodel.cli import run_graph
from nemo_automodel.errors import ConfigError
from nemo_automodel.experiment import Experiment, JobFailed, check_name, run_dir_of
from recipes import hf_auto_model_for_causal_lm, smollm2_135m  # noqa: F401  (registers their factories)

EXIT_JOB_FAILED, EXIT_BAD_INPUT = 1, 2
NAMESPACE = "automodel"


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
    alias = {list: typing.List, dict: typing.Dict, tuple: typing.Tuple}.get(origin)  # noqa: UP006
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


def _walk(graph: Any, key: str, check: bool, root: str = "the recipe", prefix: str = "") -> Any:
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


def _root_cause(err: BaseException) -> str:
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
            _walk(graph, key, check=True)
        try:
            graph = parse_cli_args(graph, [arg])
        except Exception as err:
            raise ConfigError(f"override {arg!r}: {_root_cause(err)}") from None
    return graph


def _executor_args(arg: str) -> list[str]:
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


def _factory_names(fn: Callable) -> list[str]:
    ns = _type_namespace(fn)
    return sorted(k[-1] for k in catalogue.REGISTRY if len(k) == 2 and k[0] == ns and k[-1] != "default")


# -- the run context --------------------------------------------------------------------------------
@dataclass(kw_only=True)
class AutoModelRunContext(RunContext):
    """NeMo-Run's RunContext plus sweeps, failure exit codes and one-line input errors."""

    sequential: bool = True
    summary: Optional[str] = None  # noqa: UP045

    def cli_execute(self, fn: Callable, args: list[str], entrypoint_type: str = "task") -> None:
        try:
            tasks, base = self._plan(fn, list(args))
        except (ConfigError, ValueError, TypeError, AttributeError) as err:
            print(f"error: {_root_cause(err)}", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT) from None
        try:
            self._launch(tasks, base)
        except JobFailed as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_JOB_FAILED) from None
        except ConfigError as err:
            print(f"error: {_root_cause(err)}", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT) from None
        except Exception:  # NeMo-Run would print one line and exit 0
            traceback.print_exc()
            raise SystemExit(EXIT_JOB_FAILED) from None

    def _plan(self, fn: Callable, args: list[str]) -> tuple[list[tuple[str, run.Partial, dict]], run.Partial]:
        args = [a for arg in args for a in _executor_args(arg)]
        check_name(self.name, "--name")
        _, run_args, task_args = _parse_prefixed_args(args, "run")
        executor_name = next((a.split("=", 1)[1] for a in run_args if a.startswith("executor=")), None)
        if executor_name is not None:
            factory = executors.REGISTRY.get(executor_name.split("(")[0])
            if factory is None:
                raise ConfigError(f"executor={executor_name!r} is unknown: use one of {', '.join(executors.REGISTRY)}")
            for arg in run_args:
                if arg.startswith("executor."):
                    _walk(run.Config(factory), arg[9:].split("=")[0], True, f"executor {executor_name}", "executor.")
        try:
            self.parse_args(run_args)
        except Exception as err:
            raise ConfigError(f"{'executor ' + executor_name if executor_name else 'run options'}: {_root_cause(err)}") from None
        if self.repl or self.load:
            raise ConfigError("--repl and --load are not supported by recipe files")
        if self.factory is None:
            raise ConfigError(f"no recipe given: pass --factory NAME, one of {', '.join(_factory_names(fn))}")
        if isinstance(self.factory, str) and self.factory.split("(")[0] not in _factory_names(fn):
            raise ConfigError(f"--factory {self.factory!r} is unknown: use one of {', '.join(_factory_names(fn))}")
        base = self.parse_fn(fn, [])
        fixed, axes = sweep.find_axes(task_args, lambda k: isinstance(_walk(base, k, False), (list, tuple)))
        base = apply_overrides(base, fixed)
        if not axes:
            return [(self.name, base, {})], base
        if any([self.to_yaml, self.to_toml, self.to_json]):
            raise ConfigError("--to-yaml/--to-toml/--to-json export one graph: drop the list-valued overrides")
        if self.executor is None and not self.direct:
            self.executor = executors.local()  # a sweep runs each task in its own process
        tasks = []
        for combo in sweep.expand(axes):
            task = apply_overrides(base, [f"{k}={v}" for k, v in combo.items()])
            name = sweep.task_name(combo)
            if run_dir_of(task) is not None and "log.name" not in combo:
                task.log.name = f"{task.log.name}-{name}"
            tasks.append((name, task, combo))
        return tasks, base

    def _launch(self, tasks: list[tuple[str, run.Partial, dict]], base: run.Partial) -> None:
        is_sweep = len(tasks) > 1 or bool(tasks[0][2])
        if any([self.to_yaml, self.to_toml, self.to_json]):
            _serialize_configuration(tasks[0][1], self.to_yaml, self.to_toml, self.to_json, verbose=True)
            return
        if self.dryrun:
            self._dryrun(tasks, is_sweep)
            return
        if not self._should_continue(self.skip_confirmation):
            print("not confirmed (pass --yes): exiting")
            return
        if self.direct or self.executor is None:
            for _, task, _ in tasks:
                run_graph(task)
            return
        exp = Experiment(self.name, executor=self.executor)
        for name, task, combo in tasks:
            exp.add(task, name=name if is_sweep else self.name, combo=combo)
        states = exp.run(sequential=self.sequential, detach=self.detach, check=False)
        if self.detach:
            print(f"submitted experiment {exp.id}: {states}\n"
                  f"status/logs/cancel: nemo_automodel.experiment.Experiment.from_id({exp.id!r})")
            return
        if is_sweep:
            log_dir = getattr(getattr(base, "log", None), "log_dir", ".")
            path = Path(self.summary or Path(log_dir).absolute() / f"{exp.id}_summary.md")
            print(f"\nsweep {exp.id}: final metrics (also in {path})\n{exp.summary(path)}")
        else:
            out = exp.run_dirs()[self.name]
            print(f"{self.name}: {states[self.name]}" + (f", outputs in {out}" if states[self.name] == "SUCCEEDED" else ""))
        exp.raise_for_failures(states)

    def _dryrun(self, tasks: list[tuple[str, run.Partial, dict]], is_sweep: bool) -> None:
        if is_sweep:
            print(f"sweep of {len(tasks)} tasks:")
            print(sweep.summary_table([{"task": n, **c, "run_dir": str(run_dir_of(t))} for n, t, c in tasks]))
        else:
            run.dryrun_fn(tasks[0][1], executor=self.executor)
        if self.executor is not None:
            exp = Experiment(self.name, executor=self.executor)
            for name, task, combo in tasks:
                exp.add(task, name=name if is_sweep else self.name, combo=combo)
            exp.dryrun()


# -- entry points -------------------------------------------------------------------------------------
for _fn in (api.finetune, api.pretrain):
    run.cli.entrypoint(_fn, namespace=NAMESPACE, run_ctx_cls=AutoModelRunContext)


def main(factory: Callable[..., run.Partial], target: Callable = api.finetune) -> None:
    """The ``__main__`` of a recipe file: ``factory`` is the default recipe, overridable on the command line."""
    run.cli.main(target, default_factory=factory)
