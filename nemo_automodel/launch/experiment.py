"""Run several recipe graphs as one NeMo-Run experiment, on any executor, with honest failures.

    import executors
    from nemo_automodel.launch.experiment import Experiment
    from recipes import smollm2_135m

    exp = Experiment("lora-vs-sft", executor=executors.local())
    exp.add(smollm2_135m.finetune_recipe(name="sft", peft_scheme=None), name="sft",
            executor=executors.slurm(partition="gpu", gpus_per_node=8))
    lrs = exp.add_sweep(smollm2_135m.finetune_recipe(), {"optim.optimizer_fn.lr": [1e-4, 1e-3]})
    exp.add(evaluation_graph, name="eval", dependencies=lrs)    # any run.Partial; starts after the sweep
    exp.run()                       # waits; raises JobFailed (with the log tail) if a task failed
    exp.status()                    # {"sft": "SUCCEEDED", "lr-0.0001": "SUCCEEDED", ...}
    print(exp.logs("sft"))          # the last lines of the task's log
    print(exp.summary())            # final metrics per task, from each run's metrics.jsonl

``run(detach=True)`` returns once Slurm jobs are submitted; ``Experiment.from_id(exp.id)`` in
another process gives ``status()``, ``logs()`` and ``cancel()`` back. Plain NeMo-Run reports a
failed job only in its status table and exits 0; here a failure is a `JobFailed` exception.
Plain NeMo-Run also re-executes the launching script inside every job (so that functions defined
in ``__main__`` resolve); a script that launches at module level then launches again from its
own jobs. `Experiment.run` skips that unless a task really calls something from ``__main__``.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fiddle as fdl
import nemo_run as run

from nemo_automodel.errors import ConfigError
from nemo_automodel.launch import sweep
from nemo_automodel.launch.job_env import job_env
from nemo_automodel.launch.tracker_params import with_tracker_params

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DONE = {"SUCCEEDED", "FAILED", "CANCELLED", "UNKNOWN"}
NODE_LOG = re.compile(r"^(.+)_node\d+\.(out|err)$")  # one node's log of one attempt; group 1: the attempt
LOG_GLOBS = ("**/combined.log", "**/log-*.out", "**/log_*.out", "**/*.log", "**/*.out", "**/*.err")


class JobFailed(RuntimeError):
    """A task ended in a state other than SUCCEEDED; the message carries its log tail."""

    def __init__(self, failures: dict[str, str], tails: dict[str, str]) -> None:
        self.failures, self.tails = failures, tails
        parts = [f"{name}: {state}" for name, state in failures.items()]
        text = f"{len(failures)} task(s) failed ({', '.join(parts)})"
        for name, tail in tails.items():
            text += f"\n----- last lines of {name}'s log -----\n{tail.rstrip()}"
        super().__init__(text)


def check_name(name: str, what: str = "name") -> str:
    """Experiment and task names end up in paths, sbatch scripts and container names: keep them plain."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"{what}={name!r} is invalid: use letters, digits, '.', '_' and '-' "
                          "(at most 128, starting with a letter or digit)")
    return name


def log_tail(job_dir: str | Path, lines: int = 40) -> str:
    """The last ``lines`` lines of the newest log file under a task's ``job_dir``; of a multi-node Slurm job,
    of every node's file of the newest attempt (``…_node<i>.out``, `executors.slurm.PerNodeLogs`)."""
    files: list[Path] = []
    for pattern in LOG_GLOBS:
        files += [p for p in Path(job_dir).glob(pattern) if p.is_file() and "configs" not in p.parts]
        if files:
            break
    if not files:
        return f"(no log files under {job_dir})"
    newest = max(files, key=lambda p: p.stat().st_mtime)
    attempt = NODE_LOG.match(newest.name)
    shown = [newest] if attempt is None else sorted(
        p for p in files if p.parent == newest.parent and (m := NODE_LOG.match(p.name)) and m[1] == attempt[1])
    return "\n".join(f"[{p}]\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) for p in shown)


def run_dir_of(task: run.Partial) -> Path | None:
    """``<log.log_dir>/<log.name>`` of a recipe graph, where metrics.jsonl and checkpoints go."""
    log = getattr(task, "log", None)
    if log is None or not hasattr(log, "log_dir") or not hasattr(log, "name"):
        return None
    return Path(log.log_dir) / log.name


def localize_outputs(task: run.Partial, executor: run.Executor | None) -> run.Partial:
    """Make ``log.log_dir`` absolute for executors that share this filesystem, and mount it for Docker.

    A relative log dir would otherwise resolve inside the job's own folder. Returns a copy.
    """
    task = copy.deepcopy(task)
    log = getattr(task, "log", None)
    remote = isinstance(executor, run.SlurmExecutor) and isinstance(executor.tunnel, run.SSHTunnel)
    if log is None or not hasattr(log, "log_dir") or remote:
        return task
    log.log_dir = os.path.abspath(str(log.log_dir))
    if isinstance(executor, run.DockerExecutor):
        Path(log.log_dir).mkdir(parents=True, exist_ok=True)
        if not any(v.split(":")[0] == log.log_dir for v in executor.volumes):
            executor.volumes.append(f"{log.log_dir}:{log.log_dir}")
    return task


class Experiment:
    """Tasks (recipe graphs), each with an executor, launched together as a `run.Experiment`."""

    def __init__(self, title: str, executor: run.Executor | None = None, log_tail_lines: int = 40) -> None:
        self.title = check_name(title, "experiment title")
        self.executor = executor
        self.log_tail_lines = log_tail_lines
        self._tasks: list[dict[str, Any]] = []
        self._exp: run.Experiment | None = None

    @classmethod
    def from_id(cls, exp_id: str) -> Experiment:
        """Reattach to an experiment launched earlier (also from another process)."""
        exp = cls(exp_id.rpartition("_")[0] or exp_id)
        exp._exp = run.Experiment.from_id(exp_id)
        exp._tasks = [{"name": job.id, "task": job.task, "executor": job.executor} for job in exp._exp.jobs]
        return exp

    @property
    def id(self) -> str | None:
        return self._exp._id if self._exp else None

    @property
    def names(self) -> list[str]:
        return [t["name"] for t in self._tasks]

    def add(self, task: run.Partial, name: str, executor: run.Executor | None = None,
            dependencies: list[str] | None = None, combo: dict[str, str] | None = None) -> str:
        """Queue ``task`` as ``name`` (``combo``: the swept values, shown in `summary`)."""
        check_name(name, "task name")
        if name in self.names:
            raise ConfigError(f"task name {name!r} is used twice in experiment {self.title!r}")
        for dep in dependencies or []:
            if dep not in self.names:
                raise ConfigError(f"dependency {dep!r} of {name!r} is not an earlier task: {self.names}")
        executor = executor or self.executor or _default_executor()
        executor = executor.clone()
        task = with_tracker_params(localize_outputs(task, executor))  # the submitted values, as tracker params
        self._tasks.append({"name": name, "task": task, "executor": executor,
                            "dependencies": list(dependencies or []), "combo": dict(combo or {})})
        return name

    def add_sweep(self, task: run.Partial, grid: dict[str, list], executor: run.Executor | None = None) -> list[str]:
        """One task per point of ``grid`` (``{"optim.optimizer_fn.lr": [1e-4, 3e-4], ...}``), named and
        given its own ``log.name`` like a command-line sweep (`sweep_tasks`). Returns the task names."""
        axes = [sweep.Axis(key, tuple(values)) for key, values in grid.items()]
        return [self.add(variant, name=name, executor=executor, combo=combo)
                for name, variant, combo in sweep_tasks(task, axes, _assign)]

    def _new(self) -> run.Experiment:
        return run.Experiment(self.title, executor=self.executor or _default_executor(), log_level="WARN",
                              enable_goodbye_message=False)

    def _add_all(self, exp: run.Experiment) -> None:
        for t in self._tasks:
            exp.add(t["task"], executor=t["executor"], name=t["name"], dependencies=t["dependencies"] or None)

    def dryrun(self) -> dict[str, str]:
        """Print and return what would be launched per task: the sbatch script, docker or torchrun request."""
        with self._new() as exp:
            self._add_all(exp)
            exp.dryrun(log=False)
        requests = {job.id: str(getattr(job, "_dryrun_info", "")) for job in exp.jobs}
        for name, request in requests.items():
            print(f"===== {name}: {type(self._task(name)['executor']).__name__} request =====\n{request}")
        return requests

    def _task(self, name: str) -> dict[str, Any]:
        return next(t for t in self._tasks if t["name"] == name)

    def run(self, sequential: bool = False, detach: bool = False, check: bool = True) -> dict[str, str]:
        """Launch every task and (unless ``detach``) wait; raise `JobFailed` if any did not succeed."""
        if not self._tasks:
            raise ConfigError(f"experiment {self.title!r} has no tasks: add some first")
        self._exp = self._new()
        # NeMo-Run copies the launching script into the experiment and re-executes it in every job
        # (for tasks defined in __main__): a script or notebook that launches at module level would
        # launch again from inside its own jobs. Skip that when no task refers to __main__.
        main = sys.modules.get("__main__")
        hidden = main if not any(_uses_main(t["task"]) for t in self._tasks) else None
        if hidden is not None:
            sys.modules["__main__"] = types.ModuleType("__main__")  # no source: NeMo-Run copies nothing
        try:
            with self._exp:
                self._add_all(self._exp)
                self._exp.run(sequential=sequential and not any(t["dependencies"] for t in self._tasks),
                              detach=detach)
        finally:
            if hidden is not None:
                sys.modules["__main__"] = hidden
        states = self.status()
        if check and not detach:
            self.raise_for_failures(states)
        return states

    def status(self) -> dict[str, str]:
        """``{task: SUCCEEDED | FAILED | CANCELLED | RUNNING | PENDING | SUBMITTED | UNKNOWN}``."""
        if self._exp is None:
            return {name: "UNSUBMITTED" for name in self.names}
        info = self._exp.status(return_dict=True) or {}
        return {name: _state(d["status"]) for name, d in info.items()}

    def status_details(self) -> dict[str, dict[str, str]]:
        """Per task: ``status``, scheduler ``job_id`` (the Slurm id), ``handle`` and ``local_dir``."""
        if self._exp is None:
            return {}
        info = self._exp.status(return_dict=True) or {}
        return {name: {k: _state(v) if k == "status" else str(v) for k, v in d.items()} for name, d in info.items()}

    def raise_for_failures(self, states: dict[str, str] | None = None) -> None:
        states = states or self.status()
        failed = {name: s for name, s in states.items() if s != "SUCCEEDED"}
        if failed:
            raise JobFailed(failed, {name: self.logs(name) for name in failed})

    def job_dir(self, name: str) -> Path:
        if self._exp is None:
            raise ConfigError(f"experiment {self.title!r} has not been launched")
        job = next((j for j in self._exp.jobs if j.id == name), None)
        if job is None:
            raise ConfigError(f"task {name!r} is not in experiment {self.title!r}: {self.names}")
        return Path(job.executor.job_dir)

    def logs(self, name: str, lines: int | None = None) -> str:
        """The last lines of ``name``'s log (rank output included; every node's, for a multi-node Slurm job)."""
        return log_tail(self.job_dir(name), lines or self.log_tail_lines)

    def cancel(self, name: str | None = None, known_within: float = 60.0) -> None:
        """Cancel one task, or every task (``scancel`` on Slurm, container removal on Docker).

        NeMo-Run cancels only jobs its scheduler already reports; a Slurm job whose accounting
        row has not reached ``sacct`` yet would be skipped silently. So each task is first
        awaited (up to ``known_within`` seconds) until the scheduler reports a state.
        """
        if self._exp is None:
            raise ConfigError(f"experiment {self.title!r} has not been launched")
        for job_name in [name] if name else self.names:
            self.job_dir(job_name)  # raises for an unknown name
            deadline = time.monotonic() + known_within
            while self.status().get(job_name) in _NOT_YET_KNOWN and time.monotonic() < deadline:
                time.sleep(0.5)
            self._exp.cancel(job_name)

    def run_dirs(self) -> dict[str, Path | None]:
        return {t["name"]: run_dir_of(t["task"]) for t in self._tasks}

    def summary(self, path: str | Path | None = None) -> str:
        """A table of each task's status, swept values and final metrics; also written to ``path``."""
        states = self.status()
        rows = sweep.summary_rows([(t["name"], t.get("combo", {}), states.get(t["name"], "?"), run_dir_of(t["task"]))
                                   for t in self._tasks])
        table = sweep.summary_table(rows)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(table + "\n")
        return table


def sweep_tasks(task: run.Partial, axes: list[sweep.Axis],
                assign: Callable[[run.Partial, dict[str, Any]], run.Partial]) -> list[tuple[str, run.Partial, dict]]:
    """``(name, graph, combo)`` per point of the axes' cartesian product (first axis slowest), for the CLI's
    sweeps and `Experiment.add_sweep`: ``assign(task, point)`` returns a copy of ``task`` with the point's
    values set; the name is `sweep.task_name`'s and, unless the point sets ``log.name``, the graph writes
    to its own run dir ``<log.name>-<name>``; ``combo`` holds the values as text."""
    tasks = []
    for point in sweep.expand(axes):
        variant, combo = assign(task, point), {key: str(value) for key, value in point.items()}
        name = sweep.task_name(combo)
        if run_dir_of(variant) is not None and "log.name" not in point:
            variant.log.name = f"{variant.log.name}-{name}"
        tasks.append((name, variant, combo))
    return tasks


def _assign(task: run.Partial, point: dict[str, Any]) -> run.Partial:
    """A copy of ``task`` with each dotted argument path of ``point`` set to its (Python) value."""
    task = copy.deepcopy(task)
    for path, value in point.items():
        *parents, leaf = path.split(".")
        node = task
        for part in parents:
            node = getattr(node, part, None)
        if not isinstance(node, fdl.Buildable) or leaf not in _arguments(node):
            raise ConfigError(f"sweep key {path!r} does not name an argument of the recipe graph")
        setattr(node, leaf, value)
    return task


def _uses_main(value: Any) -> bool:
    """Whether a graph calls anything defined in ``__main__`` (the launching script)."""
    if isinstance(value, fdl.Buildable):
        return _uses_main(value.__fn_or_cls__) or any(_uses_main(v) for v in value.__arguments__.values())
    if isinstance(value, (list, tuple, set)):
        return any(_uses_main(v) for v in value)
    if isinstance(value, dict):
        return any(_uses_main(v) for v in value.values())
    return callable(value) and getattr(value, "__module__", None) == "__main__"


def _arguments(node: fdl.Buildable) -> set[str]:
    return set(inspect.signature(node.__fn_or_cls__).parameters)


_NOT_YET_KNOWN = ("SUBMITTED", "UNKNOWN")


def _state(status: Any) -> str:
    return getattr(status, "name", str(status)).upper()


def _default_executor() -> run.Executor:
    """One local process with this venv's environment (what ``executors.local()`` returns)."""
    return run.LocalExecutor(ntasks_per_node=1, env_vars=job_env())
