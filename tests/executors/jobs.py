"""Tiny job functions for executor tests (importable in a job with ``PYTHONPATH=<repo root>``)."""

from __future__ import annotations

import json
import os
import time


def write_env(path: str, names: list[str]) -> None:
    """Write the job's values of ``names`` (and its rank) to ``path`` as JSON."""
    values = {n: os.environ.get(n) for n in names}
    with open(path, "w") as f:
        json.dump(values, f)


def fail(message: str) -> None:
    print(f"about to fail: {message}", flush=True)
    raise RuntimeError(message)


def sleep(seconds: float) -> None:
    print(f"sleeping {seconds}s", flush=True)
    time.sleep(seconds)


class StepJournal:
    """A trainer callback: after every step each rank appends ``{"pid", "node", "rank", "step", "loss"}`` to
    ``path`` (one short line per append): which process reached which step, across elastic restarts and
    requeues. ``loss`` is the step's logged ``train_loss`` (the same on every rank)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_step_end(self, trainer, step: int, metrics: dict[str, float]) -> None:
        row = {"pid": os.getpid(), "node": os.environ.get("SLURMD_NODENAME"), "rank": int(os.environ.get("RANK", "0")),
               "step": step, "loss": metrics.get("train_loss")}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
