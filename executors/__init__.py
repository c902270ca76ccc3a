"""Executor factories: where a recipe runs. Plain functions returning NeMo-Run executors.

    import executors
    run.run(recipe, executor=executors.local(ntasks_per_node=2))           # torchrun, 2 ranks
    run.run(recipe, executor=executors.docker(mounts=["/data:/data"]))
    run.run(recipe, executor=executors.slurm(partition="gpu", nodes=2, gpus_per_node=8))

Importing this package also registers them for NeMo-Run's CLI by name, with their arguments as
knobs: ``run.executor=slurm run.executor.nodes=2`` or ``run.executor=local(ntasks_per_node=2)``
(our recipe files also accept ``executor=slurm executor.nodes=2``).
"""

import functools
from collections.abc import Callable

import nemo_run as run

from executors.docker import docker
from executors.local import local
from executors.slurm import slurm
from nemo_automodel.launch.job_env import job_env, venv_bin

__all__ = ["local", "docker", "slurm", "job_env", "venv_bin", "REGISTRY"]

#: CLI name -> factory
REGISTRY: dict[str, Callable[..., run.Executor]] = {"local": local, "docker": docker, "slurm": slurm}


def _register(name: str, fn: Callable[..., run.Executor]) -> None:
    """Register ``fn`` under ``name`` so the CLI gets a ``run.Config(fn, ...)`` it can override and build."""

    @functools.wraps(fn)
    def factory(*args, **kwargs) -> run.Config:
        return run.Config(fn, *args, **kwargs)

    run.cli.factory(factory, target=run.Executor, name=name)


for _name, _fn in REGISTRY.items():
    _register(_name, _fn)
