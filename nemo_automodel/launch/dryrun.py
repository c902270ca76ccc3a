"""What a recipe's ``--dryrun`` prints beyond the graph: the processes, the device mesh and the memory plan.

All three are read from the graph and the executor; nothing is built, and nothing here fails the dry run.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping

import nemo_run as run

from nemo_automodel.errors import ConfigError
from nemo_automodel.launch.nemo_run_cli import root_cause
from nemo_automodel.launch.plan_recipe import fit_recipe, plan_recipe, strategy_sizes
from nemo_automodel.parallel.mesh import describe_mesh, mesh_dims


def processes(task: run.Partial, executor: run.Executor | None) -> tuple[int, int]:
    """(processes in all, per node) of a launch: the executor's torchrun layout, else the trainer's devices."""
    try:
        if executor is not None and executor.nproc_per_node():
            return executor.nnodes() * executor.nproc_per_node(), executor.nproc_per_node()
    except NotImplementedError:  # an executor without a torchrun layout
        pass
    trainer = getattr(task, "trainer", None)
    devices = int(getattr(trainer, "devices", 1) or 1)
    return devices * int(getattr(trainer, "num_nodes", 1) or 1), devices


def mesh_report(task: run.Partial, world: int, per_node: int) -> str:
    """The device mesh the strategy node asks for (``mesh (dp=2, tp=8) over 16 ranks on 2 nodes x 8: …``), and
    the experts' view of it with expert parallel (``…; experts (efsdp=2, ep=8): ep groups within a node``)."""
    trainer = getattr(task, "trainer", None)
    if trainer is None:
        return "mesh: no trainer node"
    sizes = strategy_sizes(trainer)
    strategy = getattr(trainer, "strategy", None)
    configured = strategy is not None and not isinstance(strategy, str)
    try:
        dims = mesh_dims(world, getattr(strategy, "data_parallel_size", None) if configured else None,
                         sizes["context_parallel"], sizes["tensor_parallel"])
        return describe_mesh(dims, per_node, int(getattr(strategy, "expert_parallel_size", 1) if configured else 1))
    except ConfigError as err:
        return f"mesh: not possible ({root_cause(err)})"


def plan_report(task: run.Partial, gpus: int | None = None) -> str:
    """The memory plan of a task, or one line saying why it is not estimated; with ``trainer.fit_memory``, the
    changes it would make (or why nothing it may change fits)."""
    try:
        report = str(plan_recipe(task, gpus=gpus, build_nodes=False))
    except ConfigError as err:
        return f"memory plan: not estimated ({root_cause(err)})"
    except Exception as err:  # a planner failure must not fail the dryrun
        return f"memory plan: not estimated ({type(err).__name__}: {root_cause(err)})"
    try:
        fit = fit_recipe(task, gpus=gpus, build_nodes=False)
    except ConfigError as err:
        fit = [f"fit_memory: the job would stop before loading: {root_cause(err)}"]
    except Exception as err:  # a planner failure must not fail the dryrun
        fit = [f"fit_memory: not planned ({type(err).__name__}: {root_cause(err)})"]
    if fit:  # the fit's budget stands in for the plan's
        report = "\n".join(line for line in report.splitlines() if not line.startswith("  no memory budget given"))
    return "\n".join([report, *fit])


def _slurm_node_names(nodelist: str) -> list[str]:
    proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    return proc.stdout.split() if proc.returncode == 0 else []


def _node_addr(node: str) -> str | None:
    proc = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=30)
    fields = dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f)
    return fields.get("NodeAddr") if proc.returncode == 0 else None


def allocation_report(executor: run.Executor | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """Inside a Slurm allocation (``salloc -N2``, or a job), a Slurm launch's real nodes: ``inside Slurm allocation
    12: nodes n1, n2; torchrun rendezvous on n1 at 127.0.0.1:29500 (its NodeAddr)``. None elsewhere."""
    nodelist = environ.get("SLURM_JOB_NODELIST")
    if not isinstance(executor, run.SlurmExecutor) or not nodelist:
        return None
    try:
        nodes = _slurm_node_names(nodelist)
    except (OSError, subprocess.SubprocessError) as err:  # no scontrol here: say so, never fail the dry run
        return f"inside Slurm allocation {environ.get('SLURM_JOB_ID', '?')}: node names unknown ({err})"
    line = f"inside Slurm allocation {environ.get('SLURM_JOB_ID', '?')}: nodes {', '.join(nodes) or nodelist}"
    wanted = int(executor.nodes or 1)
    if nodes and len(nodes) < wanted:
        line += f" (the job asks {wanted} nodes: more than this allocation holds)"
    if executor.launcher is not None and wanted > 1 and nodes:
        port = getattr(executor.get_launcher(), "rdzv_port", 29500)
        addr = _node_addr(nodes[0])
        line += f"; torchrun rendezvous on {nodes[0]}" + (f" at {addr}:{port} (its NodeAddr)" if addr else "")
    return line
