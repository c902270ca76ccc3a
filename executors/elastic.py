"""Elastic restarts inside one job: torchrun's ``--max-restarts``, for every executor that launches torchrun.

NeMo-Run's ``Torchrun`` launcher has no field for it, but torchrun reads each option from a ``PET_<OPTION>``
variable when the command line does not set it: the executors put ``PET_MAX_RESTARTS`` into the job's
environment (``--dryrun`` shows it among the exports).

With restarts on, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` too. Otherwise torchrun (2.13) hands the workers of
every restart the same TCP store, kept by the first rank-0 agent, still holding the keys the previous workers'
process group wrote: restarted workers can find their predecessors' entries and wait on each other until the store
timeout (pytorch/pytorch#135712; seen here: after the 4th worker kill on 2 Slurm nodes the new workers never got
past process-group set-up). With the variable set, each restart's rank-0 worker opens a fresh store.
"""

from __future__ import annotations

from nemo_automodel.errors import ConfigError, check_int


def wants_torchrun(max_restarts: int) -> bool:
    """``launcher="auto"`` picks torchrun for a restartable job even with one process (only torchrun restarts)."""
    check_int("max_restarts", max_restarts, minimum=0)
    return max_restarts > 0


def restart_env(max_restarts: int, launcher: str | None) -> dict[str, str]:
    """The variables that make torchrun restart a failed worker group up to ``max_restarts`` times.

    After a worker dies (a crash, SIGKILL, a lost GPU) torchrun stops the workers of every node, runs the
    rendezvous again and starts them anew; they resume from the run's last verified checkpoint
    (``AutoResume``). A whole node lost (its torchrun gone too) is not restarted: that takes a requeue.
    SIGTERM (a preemption) is never restarted: the workers checkpoint and exit 75."""
    if not wants_torchrun(max_restarts):
        return {}
    if launcher != "torchrun":
        raise ConfigError(f"max_restarts={max_restarts} restarts torchrun's workers, but launcher={launcher!r} "
                          "starts plain processes: use launcher='torchrun' (or 'auto')")
    return {"PET_MAX_RESTARTS": str(max_restarts), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
