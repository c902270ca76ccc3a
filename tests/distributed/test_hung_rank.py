"""A hung rank does not hang the job: with rank 1 stopped (SIGSTOP) mid-run, rank 0's next collective fails after
``Trainer(collective_timeout=…)``, with an error naming the timeout and the rank, and the launch exits non-zero."""

from __future__ import annotations

import signal
import time

import psutil
import pytest
from harness import kill_tree, start, wait_for_step

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TIMEOUT = 5  # seconds: the trainer's collective timeout for this run


def _rank(proc, rank: int) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "worker.py" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no rank {rank} among the launch's processes")


def test_a_stopped_rank_fails_the_job_within_the_collective_timeout(small_model, token_data, tmp_path):
    run = {"model": str(small_model), "data": str(token_data), "micro": 2, "global": 4, "steps": 400, "total": 400,
           "strategy": "fsdp2", "collective_timeout": TIMEOUT, "log_dir": str(tmp_path / "runs"), "name": "hung"}
    proc = start(tmp_path, [run])
    hung = None
    try:
        wait_for_step(proc, tmp_path / "runs" / "hung", 2)
        hung = _rank(proc, 1)
        hung.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        code = proc.wait(timeout=TIMEOUT + 120)  # without the timeout this would wait 30 min (gloo's default)
        waited = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        if hung is not None and hung.is_running():
            hung.kill()  # SIGKILL reaches a stopped process
    log = "".join(p.read_text() for p in tmp_path.glob("log-*.txt"))
    assert code != 0, log[-3000:]
    assert f"rank 0: a collective got no answer from a peer rank within collective_timeout={TIMEOUT} s" in log, \
        log[-3000:]
    print(f"stopped rank 1; the launch exited {code} after {waited:.1f} s (timeout {TIMEOUT} s)")
