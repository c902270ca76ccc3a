"""``Trainer(devices=N)`` from a plain ``python`` process: start N local workers and fit in each.

Choice: torchrun's own machinery, called as a library (``torch.distributed.launcher.api.
elastic_launch``: the elastic agent, c10d rendezvous on a free localhost port, ``spawn``ed
workers with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR set). Each worker unpickles the
trainer, model, data, peft, optim, logger and resume configs and calls ``Trainer.fit``; the
parent returns rank 0's run directory. We did not re-exec the script under torchrun: that would
run everything before ``fit`` again and cannot work from a notebook.

Consequences a user sees:
- the script needs an ``if __name__ == "__main__":`` guard (``spawn`` imports it in each worker),
  and the configs passed to ``fit`` (callbacks included) must be picklable;
- the trained weights live in the run directory (``checkpoints/last``), not in the parent's
  ``model`` object, which never loads;
- SIGTERM to the parent is forwarded to the workers, which checkpoint at the next step
  boundary; the parent then exits with ``PREEMPTED_EXIT_CODE`` (75), as a single process does.

Under torchrun, NeMo-Run or Slurm+torchrun (WORLD_SIZE set) nothing is launched: each process
already is a worker.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from nemo_automodel.checkpoint.save_load import latest_checkpoint
from nemo_automodel.errors import ConfigError

SHUTDOWN_TIMEOUT_S = 300  # how long workers get to write their SIGTERM checkpoint


def needs_launch(devices: int, num_nodes: int) -> bool:
    """True when more than one process is asked for but no launcher started them."""
    return devices * num_nodes > 1 and "WORLD_SIZE" not in os.environ


def launch_fit(trainer: Any, nproc: int, fit_args: tuple, ckpt_root: Path, preempted_exit_code: int) -> Path:
    """Run ``trainer.fit(*fit_args)`` in ``nproc`` local workers; return rank 0's result. (``trainer``: the
    ``Trainer``, typed Any as its module imports this one.)"""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          start_method="spawn", shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    started = time.time()
    try:
        results = elastic_launch(config, _worker)(trainer, nproc, fit_args)
    except SignalException as err:
        if err.sigval == signal.SIGTERM and _preempted_since(ckpt_root, started):
            raise SystemExit(preempted_exit_code) from None
        raise
    except ChildFailedError as err:
        if err.failures and all(f.exitcode == preempted_exit_code for f in err.failures.values()):
            raise SystemExit(preempted_exit_code) from None
        config_error = _config_error(err)
        if config_error:  # bad input found where the job runs: one line, as in a single process
            raise ConfigError(config_error) from None
        raise
    finally:
        for sig, handler in handlers.items():  # the elastic agent installs its own
            signal.signal(sig, handler)
    return results[0]


def _worker(trainer: Any, nproc: int, fit_args: tuple) -> Path:
    """Entry point of one spawned worker (module level, so ``spawn`` can import it)."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: share the cores, don't oversubscribe
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    try:
        return trainer.fit(*fit_args)
    finally:
        trainer.strategy.teardown()


def _config_error(err: Any) -> str | None:
    """The message of a ConfigError raised in a worker, if that is why it failed."""
    for failure in err.failures.values():
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else str(failure.message)
        if message.startswith("ConfigError: "):
            return message.removeprefix("ConfigError: ")
    return None


def _preempted_since(ckpt_root: Path, started: float) -> bool:
    """Whether the workers wrote a SIGTERM checkpoint during this launch."""
    last = latest_checkpoint(ckpt_root)
    if last is None:
        return False
    meta = json.loads((last / "meta.json").read_text())
    return bool(meta.get("preempted")) and meta.get("saved_at", 0) >= started
