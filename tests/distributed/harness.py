"""Process helpers for the multi-process tests.

Every training here runs in real processes (torchrun, or ``python`` for one process / the
trainer's own launcher) through ``worker.py``; gloo on CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")
ROOT = Path(__file__).resolve().parents[2]
STEPS = 8  # 16 rows / global batch 4 = 4 steps per epoch: 8 steps cross an epoch boundary
# a worker run's keys for 2 plain-SGD steps without dropout: its weights show a wrong gradient scale (assert_sgd_equal)
SGD = {"optim": "sgd", "lr": 1.0, "steps": 2, "dropout": 0.0}


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def command(spec: Path, nproc: int, worker: Path = WORKER) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(worker), str(spec)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(worker), str(spec)]


def write_spec(path: Path, runs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}))
    return path


def launch(tmp: Path, runs: list[dict], nproc: int = 2, timeout: float = 600, check: bool = True,
           worker: Path = WORKER):
    """Run ``worker`` (default ``worker.py``) on ``runs`` in ``nproc`` processes and wait; returns the
    CompletedProcess."""
    spec = write_spec(tmp / f"spec-{time.monotonic_ns()}.json", runs)
    proc = subprocess.run(command(spec, nproc, worker), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def start(tmp: Path, runs: list[dict], nproc: int = 2) -> subprocess.Popen:
    """Start ``worker.py`` in its own session (so the whole process tree can be signalled)."""
    spec = write_spec(tmp / f"spec-{time.monotonic_ns()}.json", runs)
    log = open(tmp / f"log-{time.monotonic_ns()}.txt", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command(spec, nproc), cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> int:
    """Block until rank 0 logged ``step`` (or later); returns the step seen."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}: {proc.args}")
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        if rows and rows[-1]["step"] >= step:
            return rows[-1]["step"]
        time.sleep(0.005)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def worker_process(proc: subprocess.Popen, rank: int):
    """The ``worker.py`` process of ``rank`` among the launch's descendants (a ``psutil.Process``)."""
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "worker.py" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no rank {rank} among the launch's processes")


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
    """Signal ``proc`` and every descendant. torchrun starts its workers in sessions of their own, so
    signalling the process group alone leaves them running (the run then finishes by itself)."""
    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    psutil.wait_procs(tree, timeout=120)
    return proc.wait(timeout=120)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_sgd_equal(got: dict, ref: dict, init: dict, what: str, below: float = 1e-2) -> None:
    """Weights after plain-SGD steps on N ranks (``got``) against one process (``ref``), both from ``init``:
    their difference must stay under ``below`` x what a halved gradient would make (half the single process's
    update ``ref - init``), so a wrong gradient scale cannot pass."""
    diff, halved = max_diff(got, ref), max_diff(ref, {k: init[k] for k in ref}) / 2
    print(f"{what}: plain SGD, max weight difference vs one process {diff:.2e}; "
          f"a halved gradient would make ~{halved:.2e} (ratio {diff / halved:.1e})")
    assert halved > 1e-3, halved  # the step moved the weights
    assert diff < below * halved, (diff, halved)


def assert_sgd_runs_equal(got: Path, ref: Path, what: str, weights: str = "final.pt") -> None:
    """``assert_sgd_equal`` on the ``out`` folders of two SGD runs (``weights`` and ``init.pt``, which must be equal)."""
    import torch

    def load(path: Path) -> dict:
        return torch.load(path, weights_only=True)

    init = load(ref / "init.pt")
    assert max_diff(load(got / "init.pt"), init) == 0.0  # the same start (LoRA's random init included)
    assert_sgd_equal(load(got / weights), load(ref / weights), init, what)


def meta(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]
