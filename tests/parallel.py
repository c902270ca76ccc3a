"""How the suite shares two cores under pytest-xdist (``make test`` runs ``-n 2 --dist loadfile``).

- **Cores.** Each worker takes whole files and runs torch with one intra-op thread. A test that starts
  processes of its own (markers in ``PROCESS_MARKERS``: torchrun ranks, Slurm jobs, dockerd containers,
  vLLM engines) holds a file lock, so at most one such test runs at a time: its ranks and one
  single-process test on the other worker. Measured on 2 cores, this finished the suite in 21 min where
  the serial run took about 40; such tests spend much of their time starting interpreters, waiting on
  daemons and polling, so the other worker's test fills the gaps. ``NEMO_AUTOMODEL_TEST_ALONE=1`` makes
  them hold both cores instead (a readers-writer lock with a turnstile, so a waiting one is not starved).
- **Builds.** :func:`shared_build` builds a fixture's folder once per ``make test`` and lets the other
  worker reuse it: a lock, the build in place (training runs and exports record their own absolute paths,
  so no rename), then a marker written last. The folder lives in the run's own temporary root, so nothing
  carries over to the next run: every run trains and exports anew.

Without xdist (a plain ``pytest`` call) there is one process and the run's basetemp is the root.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PROCESS_MARKERS = ("distributed", "slurm", "docker", "vllm", "llamacpp")
BUILT = ".built-by-the-suite"  # written last into a shared folder
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... under xdist; None in a plain run
ALONE = os.environ.get("NEMO_AUTOMODEL_TEST_ALONE") == "1"  # process-starting tests hold both cores


def starts_processes(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(m) for m in PROCESS_MARKERS)


def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every worker of this run shares (xdist gives each worker ``<root>/popen-gwN``)."""
    base = tmp_path_factory.getbasetemp()
    # a pytest started by a test inherits PYTEST_XDIST_WORKER but is no worker: its basetemp is its own root
    return base.parent if base.name == f"popen-{WORKER}" else base


@contextlib.contextmanager
def cpu_share(root: Path, starts_processes: bool, alone: bool = ALONE) -> Iterator[None]:
    """Hold the right to run: one process-starting test at a time; with ``alone`` it also waits for the
    other worker's current test and holds that worker back (a readers-writer lock)."""
    root.mkdir(parents=True, exist_ok=True)
    if not alone:
        with _locked(root / "processes.lock") if starts_processes else contextlib.nullcontext():
            yield
        return
    with open(root / "cpu.lock", "a") as lock:
        with _locked(root / "cpu.turnstile"):  # in arrival order: an exclusive waiter holds back new entries
            fcntl.flock(lock, fcntl.LOCK_EX if starts_processes else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shared_build(tmp_path_factory: pytest.TempPathFactory, key: str, build: Callable[[Path], object]) -> Path:
    """``<run root>/shared/<key>``, built by ``build(folder)`` in whichever worker asks first; a build that
    died half-way (no marker) is wiped and redone by the next asker."""
    folder = run_root(tmp_path_factory) / "shared" / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent / f"{key}.lock"):
        if not (folder / BUILT).is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / BUILT).write_text("ok\n")
    return folder
