"""Recipe files on the command line: NeMo-Run's override syntax, executors, sweeps, honest exit codes.

    python recipes/smollm2_135m.py trainer.max_steps=5 --yes                   # in this process
    python recipes/smollm2_135m.py peft=None optim.optimizer_fn.lr=5e-5 --dryrun  # print the graph
    python recipes/smollm2_135m.py executor=local executor.ntasks_per_node=2 trainer.strategy=ddp --yes
    python recipes/smollm2_135m.py executor=slurm executor.nodes=2 --dryrun    # + the sbatch script
    python recipes/smollm2_135m.py optim.optimizer_fn.lr=[1e-4,3e-4] peft.dim=[8,16] --yes  # 4 runs
    nemo automodel finetune --factory smollm2_135m trainer.max_steps=5 --yes    # same, via `nemo`
    nemo automodel plan smollm2_135m --gpus 8 --gpu-memory 80GiB --seq 4096     # will it fit? (nemo_automodel.plan)
    nemo automodel preflight smollm2_135m data.seq_length=512 --html data.html   # what will it train on?

``executor=NAME`` / ``executor.KEY=V`` are accepted as aliases of NeMo-Run's ``run.executor=…``.
Sweeps run as one experiment (sequentially; ``run.sequential=False`` for parallel) on the given
executor, or `executors.local` if none (``--direct``: one after another in this process), and end
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import catalogue
import nemo_run as run
import typer
from nemo_run.cli.api import (
    ROOT_ENTRYPOINT_NAMESPACE,
    RunContext,
    _parse_prefixed_args,
    _serialize_configuration,
)

import executors
import recipes
from nemo_automodel import api
from nemo_automodel.errors import ConfigError
from nemo_automodel.launch import sweep
from nemo_automodel.launch.experiment import Experiment, JobFailed, check_name, run_dir_of
from nemo_automodel.launch.guard import EXIT_CONFIG_ERROR, EXIT_RUN_ERROR, run_graph
from nemo_automodel.launch.nemo_run_cli import apply_overrides, executor_args, factory_names, root_cause, walk

EXIT_JOB_FAILED, EXIT_BAD_INPUT = EXIT_RUN_ERROR, EXIT_CONFIG_ERROR
NAMESPACE = "automodel"


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

    def _plan(self, fn: Callable, args: list[str]) -> tuple[list[tuple[str, run.Partial, dict]], run.Partial]:
        args = [a for arg in args for a in executor_args(arg)]
        check_name(self.name, "--name")
        _, run_args, task_args = _parse_prefixed_args(args, "run")
        executor_name = next((a.split("=", 1)[1] for a in run_args if a.startswith("executor=")), None)
        if executor_name is not None:
            factory = executors.REGISTRY.get(executor_name.split("(")[0])
            if factory is None:
                raise ConfigError(f"executor={executor_name!r} is unknown: use one of {', '.join(executors.REGISTRY)}")
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

    def _dryrun(self, tasks: list[tuple[str, run.Partial, dict]], is_sweep: bool) -> None:
        if is_sweep:
            print(f"sweep of {len(tasks)} tasks:")
            print(sweep.summary_table([{"task": n, **c, "run_dir": str(run_dir_of(t))} for n, t, c in tasks]))
        else:
            run.dryrun_fn(tasks[0][1], executor=self.executor)
            world, per_node = _processes(tasks[0][1], self.executor)
            print(_dryrun_mesh(tasks[0][1], world, per_node))
            print(_dryrun_plan(tasks[0][1], world))
        if self.executor is not None:
            exp = Experiment(self.name, executor=self.executor)
            for name, task, combo in tasks:
                exp.add(task, name=name if is_sweep else self.name, combo=combo)
            exp.dryrun()


def _processes(task: run.Partial, executor: Optional[run.Executor]) -> tuple[int, int]:  # noqa: UP045
    """(processes in all, per node) of a launch: the executor's torchrun layout, else the trainer's devices."""
    try:
        if executor is not None and executor.nproc_per_node():
            return executor.nnodes() * executor.nproc_per_node(), executor.nproc_per_node()
    except NotImplementedError:  # an executor without a torchrun layout
        pass
    trainer = getattr(task, "trainer", None)
    devices = int(getattr(trainer, "devices", 1) or 1)
    return devices * int(getattr(trainer, "num_nodes", 1) or 1), devices


def _dryrun_mesh(task: run.Partial, world: int, per_node: int) -> str:
    """The device mesh the strategy node asks for, read from the graph (nothing is built)."""
    from nemo_automodel.launch.plan_recipe import strategy_sizes
    from nemo_automodel.parallel.mesh import describe_mesh, mesh_dims

    trainer = getattr(task, "trainer", None)
    if trainer is None:
        return "mesh: no trainer node"
    sizes = strategy_sizes(trainer)
    strategy = getattr(trainer, "strategy", None)
    try:
        dims = mesh_dims(world, getattr(strategy, "data_parallel_size", None) if strategy is not None
                         and not isinstance(strategy, str) else None, sizes["context_parallel"], sizes["tensor_parallel"])
    except ConfigError as err:
        return f"mesh: not possible ({root_cause(err)})"
    return describe_mesh(dims, per_node)


def _dryrun_plan(task: run.Partial, gpus: Optional[int] = None) -> str:  # noqa: UP045
    """The memory plan of a task, or one line saying why it is not estimated (the dryrun never fails on it)."""
    from nemo_automodel.launch.plan_recipe import plan_recipe

    try:
        return str(plan_recipe(task, gpus=gpus, build_nodes=False))
    except ConfigError as err:
        return f"memory plan: not estimated ({root_cause(err)})"
    except Exception as err:  # a planner failure must not fail the dryrun
        return f"memory plan: not estimated ({type(err).__name__}: {root_cause(err)})"


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
def register_recipes() -> None:
    """Import every recipe module in ``recipes/`` so that its ``@run.cli.factory`` recipes are known."""
    for info in pkgutil.iter_modules(recipes.__path__):
        if info.name != "cli":
            importlib.import_module(f"recipes.{info.name}")


register_recipes()
for _fn in (api.finetune, api.pretrain):
    run.cli.entrypoint(_fn, namespace=NAMESPACE, run_ctx_cls=AutoModelRunContext)
for _command in COMMANDS:
    catalogue._set((ROOT_ENTRYPOINT_NAMESPACE, NAMESPACE, _command.name), _command)


def main(factory: Callable[..., run.Partial], target: Callable = api.finetune) -> None:
    """The ``__main__`` of a recipe file: ``factory`` is the default recipe, overridable on the command line."""
    run.cli.main(target, default_factory=factory)
