"""The recipe command line's harness: NeMo-Run's override syntax, executors, sweeps, honest exit codes.

``recipes/cli.py`` is the entry (``main``) the recipe files call; it hands this module the recipe
package and the executor factories (`register`), since a library module imports neither.

``executor=NAME`` / ``executor.KEY=V`` are accepted as aliases of NeMo-Run's ``run.executor=…``.
Sweeps run as one experiment (sequentially; ``run.sequential=False`` for parallel) on the given
executor, or the ``local`` executor if none (``--direct``: one after another in this process), and end
with a table of final metrics (also written to ``run.summary=PATH``, default
``<log_dir>/<experiment id>_summary.md``). ``--dryrun`` lists the tasks (and prints each
executor request, e.g. the sbatch script), and for a single task its device mesh over the executor's
nodes (``mesh (dp=2, tp=8) over 16 ranks on 2 nodes x 8: …``) and its memory plan (``nemo_automodel.plan``).
``--detach`` returns once Slurm jobs are submitted.
Exit codes: 0 success, 1 a job failed (its log tail is printed), 2 bad input (one line on stderr).
"""

# No `from __future__ import annotations` here: NeMo-Run reads the RunContext fields' annotations.
import importlib
import pkgutil
import sys
import traceback
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import catalogue
import nemo_run as run
import typer
from nemo_run.cli.api import (
    ROOT_ENTRYPOINT_NAMESPACE,
    RunContext,
    _parse_prefixed_args,
    _serialize_configuration,
)

from nemo_automodel import api
from nemo_automodel.errors import ConfigError
from nemo_automodel.launch import sweep
from nemo_automodel.launch.experiment import Experiment, JobFailed, check_name, run_dir_of, sweep_tasks
from nemo_automodel.launch.guard import EXIT_CONFIG_ERROR, EXIT_RUN_ERROR, run_graph
from nemo_automodel.launch.nemo_run_cli import apply_overrides, executor_args, factory_names, root_cause, walk

EXIT_JOB_FAILED, EXIT_BAD_INPUT = EXIT_RUN_ERROR, EXIT_CONFIG_ERROR
NAMESPACE = "automodel"
Task = tuple[str, run.Partial, dict]  # (name, graph, the swept values)


# -- the run context --------------------------------------------------------------------------------
@dataclass(kw_only=True)
class AutoModelRunContext(RunContext):
    """NeMo-Run's RunContext plus sweeps, failure exit codes and one-line input errors."""

    sequential: bool = True
    summary: Optional[str] = None  # noqa: UP045
    # name -> executor factory (``executors.REGISTRY``), set by `register`; a sweep runs on "local" by default
    executor_factories: ClassVar[Mapping[str, Callable[..., run.Executor]]] = types.MappingProxyType({})

    def cli_execute(self, fn: Callable, args: list[str], entrypoint_type: str = "task") -> None:
        try:
            tasks, base = self._plan(fn, list(args))
        except (ConfigError, ValueError, TypeError, AttributeError) as err:
            print(f"error: {root_cause(err)}", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT) from None
        try:
            self._launch(tasks, base)
        except JobFailed as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_JOB_FAILED) from None
        except ConfigError as err:
            print(f"error: {root_cause(err)}", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT) from None
        except Exception:  # NeMo-Run would print one line and exit 0
            traceback.print_exc()
            raise SystemExit(EXIT_JOB_FAILED) from None

    def _plan(self, fn: Callable, args: list[str]) -> tuple[list[Task], run.Partial]:
        args = [a for arg in args for a in executor_args(arg)]
        check_name(self.name, "--name")
        _, run_args, task_args = _parse_prefixed_args(args, "run")
        executor_name = next((a.split("=", 1)[1] for a in run_args if a.startswith("executor=")), None)
        if executor_name is not None:
            factory = self.executor_factories.get(executor_name.split("(")[0])
            if factory is None:
                raise ConfigError(f"executor={executor_name!r} is unknown: use one of "
                                  f"{', '.join(self.executor_factories)}")
            for arg in run_args:
                if arg.startswith("executor."):
                    walk(run.Config(factory), arg[9:].split("=")[0], True, f"executor {executor_name}", "executor.")
        try:
            self.parse_args(run_args)
        except Exception as err:
            raise ConfigError(f"{'executor ' + executor_name if executor_name else 'run options'}: {root_cause(err)}") from None
        if self.repl or self.load:
            raise ConfigError("--repl and --load are not supported by recipe files")
        if self.factory is None:
            raise ConfigError(f"no recipe given: pass --factory NAME, one of {', '.join(factory_names(fn))}")
        if isinstance(self.factory, str) and self.factory.split("(")[0] not in factory_names(fn):
            raise ConfigError(f"--factory {self.factory!r} is unknown: use one of {', '.join(factory_names(fn))}")
        base = self.parse_fn(fn, [])
        fixed, axes = sweep.find_axes(task_args, lambda k: isinstance(walk(base, k, False), (list, tuple)))
        base = apply_overrides(base, fixed)
        if not axes:
            return [(self.name, base, {})], base
        if any([self.to_yaml, self.to_toml, self.to_json]):
            raise ConfigError("--to-yaml/--to-toml/--to-json export one graph: drop the list-valued overrides")
        if self.executor is None and not self.direct:
            self.executor: run.Executor | None = self.executor_factories["local"]()  # a sweep runs each task in its own process
        assign = lambda task, point: apply_overrides(task, [f"{k}={v}" for k, v in point.items()])  # noqa: E731
        return sweep_tasks(base, axes, assign), base

    def _launch(self, tasks: list[Task], base: run.Partial) -> None:
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
        exp = self._experiment(tasks, is_sweep)
        states = exp.run(sequential=self.sequential, detach=self.detach, check=False)
        if self.detach:
            print(f"submitted experiment {exp.id}: {states}\n"
                  f"status/logs/cancel: nemo_automodel.launch.experiment.Experiment.from_id({exp.id!r})")
            return
        if is_sweep:
            log_dir = getattr(getattr(base, "log", None), "log_dir", ".")
            path = Path(self.summary or Path(log_dir).absolute() / f"{exp.id}_summary.md")
            print(f"\nsweep {exp.id}: final metrics (also in {path})\n{exp.summary(path)}")
        else:
            out = exp.run_dirs()[self.name]
            print(f"{self.name}: {states[self.name]}" + (f", outputs in {out}" if states[self.name] == "SUCCEEDED" else ""))
        exp.raise_for_failures(states)

    def _experiment(self, tasks: list[Task], is_sweep: bool) -> Experiment:
        exp = Experiment(self.name, executor=self.executor)
        for name, task, combo in tasks:
            exp.add(task, name=name if is_sweep else self.name, combo=combo)
        return exp

    def _dryrun(self, tasks: list[Task], is_sweep: bool) -> None:
        from nemo_automodel.launch import dryrun  # the planner's imports only when asked

        if is_sweep:
            print(f"sweep of {len(tasks)} tasks:")
            print(sweep.summary_table([{"task": n, **c, "run_dir": str(run_dir_of(t))} for n, t, c in tasks]))
        else:
            run.dryrun_fn(tasks[0][1], executor=self.executor)
            world, per_node = dryrun.processes(tasks[0][1], self.executor)
            print(dryrun.mesh_report(tasks[0][1], world, per_node))
            print(dryrun.plan_report(tasks[0][1], world))
            allocation = dryrun.allocation_report(self.executor)
            if allocation:
                print(allocation)
        if self.executor is not None:
            self._experiment(tasks, is_sweep).dryrun()


# -- recipes by name --------------------------------------------------------------------------------
def import_recipes(package: types.ModuleType) -> None:
    """Import every module of ``package`` (``recipes``) but its command line (``cli``), so that its
    ``@run.cli.factory`` recipes are known."""
    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "cli":
            importlib.import_module(f"{package.__name__}.{info.name}")


def plan_target(target: str) -> run.Partial:
    """The recipe a planner or preflight target names: a registered factory (finetune's, then pretrain's), else
    the ``hf_auto_model_for_causal_lm`` finetune recipe for a model id or folder."""
    for fn in (api.finetune, api.pretrain):
        if target in factory_names(fn):
            return run.cli.resolve_factory(fn, target)()
    return run.cli.resolve_factory(api.finetune, "hf_auto_model_for_causal_lm")(model_id=target)


class RecipeCommand:
    """A ``nemo automodel NAME …`` command on a recipe: NeMo-Run adds every entry of its entrypoint
    catalogue that has a ``cli(typer)`` method to the ``nemo`` command; ``main(argv, resolve)`` is
    the command's own parser (``plan``: the memory planner, ``preflight``: the data preflight)."""

    def __init__(self, name: str, help: str, module: str) -> None:
        self.name, self.help, self.module = name, help, module
        self.path = f"{NAMESPACE}.{name}"

    def cli(self, parent: typer.Typer) -> None:
        @parent.command(self.name, help=self.help, add_help_option=False,
                        context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
        def command(ctx: typer.Context) -> None:
            raise SystemExit(importlib.import_module(self.module).main(list(ctx.args), resolve=plan_target))


COMMANDS = (
    RecipeCommand("plan", "Will a fine-tuning job fit in GPU memory, and what to change (see --help).",
                  "nemo_automodel.launch.plan_cli"),
    RecipeCommand("preflight", "What will a job train on? The data checked with the tokenizer alone (see --help).",
                  "nemo_automodel.launch.preflight_cli"),
)


# -- entry points -------------------------------------------------------------------------------------
def register(recipe_package: types.ModuleType, executor_factories: Mapping[str, Callable[..., run.Executor]]) -> None:
    """Make the recipes of ``recipe_package`` known, ``finetune``/``pretrain`` NeMo-Run entry points (``nemo
    automodel finetune …``) with ``executor_factories`` as the ``executor=NAME`` choices, and the
    ``plan``/``preflight`` commands."""
    import_recipes(recipe_package)
    AutoModelRunContext.executor_factories = types.MappingProxyType(dict(executor_factories))
    for fn in (api.finetune, api.pretrain):
        run.cli.entrypoint(fn, namespace=NAMESPACE, run_ctx_cls=AutoModelRunContext)
    for command in COMMANDS:
        catalogue._set((ROOT_ENTRYPOINT_NAMESPACE, NAMESPACE, command.name), command)


def main(factory: Callable[..., run.Partial], target: Callable = api.finetune) -> None:
    """The ``__main__`` of a recipe file: ``factory`` is the default recipe, overridable on the command line."""
    run.cli.main(target, default_factory=factory)
