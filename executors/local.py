"""`local`: run a recipe as a subprocess on this machine, optionally under torchrun."""

# NeMo-Run's CLI parser reads these signatures and knows typing.Optional/Union, not `X | None`.
# ruff: noqa: UP007, UP045
from typing import Optional

import nemo_run as run

from executors.elastic import restart_env, wants_torchrun
from nemo_automodel.launch.job_env import job_env, resolve_launcher


def local(ntasks_per_node: int = 1, launcher: Optional[str] = "auto", env_vars: Optional[dict[str, str]] = None,
          retries: int = 0, max_restarts: int = 0) -> run.LocalExecutor:
    """A `run.LocalExecutor` that runs the job with this venv's Python.

    Args:
        ntasks_per_node: processes to start (one per GPU, or CPU ranks with gloo).
        launcher: ``"torchrun"``, ``None`` (plain ``python``), or ``"auto"``: torchrun when
            ``ntasks_per_node > 1`` or ``max_restarts > 0``. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK for the
            strategy.
        env_vars: extra environment variables; ``PATH`` already starts with this venv's ``bin``.
        retries: how often NeMo-Run relaunches a failed job.
        max_restarts: how often torchrun restarts the workers after one of them dies; they resume from the
            last checkpoint (`executors.elastic.restart_env`).

    The job's working directory is the launcher's; logs go to
    ``$NEMORUN_HOME/experiments/<title>/<id>/<task>/`` (``~/.nemo_run`` by default).
    """
    launcher = resolve_launcher(ntasks_per_node, launcher, multi=ntasks_per_node > 1 or wants_torchrun(max_restarts))
    env = {**restart_env(max_restarts, launcher), **(env_vars or {})}
    return run.LocalExecutor(ntasks_per_node=ntasks_per_node, launcher=launcher, env_vars=job_env(env),
                             retries=retries)
