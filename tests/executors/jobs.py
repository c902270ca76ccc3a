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
