"""A hung rank does not hang the job: with rank 1 stopped (SIGSTOP) mid-run, rank 0's next collective fails after
``Trainer(collective_timeout=…)``, with an error naming the timeout and the rank, and the launch exits non-zero."""

from __future__ import annotations

import signal
import time

import pytest
from harness import kill_tree, start, wait_for_step, worker_process

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TIMEOUT = 5  # seconds: the trainer's collective timeout for this run


def test_a_stopped_rank_fails_the_job_within_the_collective_timeout(small_model, token_data, tmp_path):
    run = {"model": str(small_model), "data": str(token_data), "micro": 2, "global": 4, "steps": 400, "total": 400,
           "strategy": "fsdp2", "collective_timeout": TIMEOUT, "log_dir": str(tmp_path / "runs"), "name": "hung"}
    proc = start(tmp_path, [run])
    expected = f"rank 0: a collective got no answer from a peer rank within collective_timeout={TIMEOUT} s"
    hung = None
    try:
        wait_for_step(proc, tmp_path / "runs" / "hung", 2)
        hung = worker_process(proc, 1)
        hung.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        # without the timeout rank 0 would wait 30 min (gloo's default) for the stopped peer
        failed = _wait_for_line(proc, tmp_path, expected, deadline=stopped + TIMEOUT + 120)
        # torchrun then gives the stopped worker its fixed 30 s SIGTERM grace before a SIGKILL; a dead node's
        # worker takes none, so the test ends it as the node's loss would
        hung.kill()
        code = proc.wait(timeout=60)
        exited = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        if hung is not None and hung.is_running():
            hung.kill()  # SIGKILL reaches a stopped process
    assert code != 0, _log(tmp_path)[-3000:]
    print(f"stopped rank 1; rank 0 failed after {failed:.1f} s (timeout {TIMEOUT} s); the launch exited {code} "
          f"after {exited:.1f} s")


def _log(tmp_path) -> str:
    return "".join(p.read_text() for p in tmp_path.glob("log-*.txt"))


def _wait_for_line(proc, tmp_path, line: str, deadline: float) -> float:
    """Seconds until ``line`` is in the launch's log; fails at ``deadline`` or if the launch ends without it."""
    start = time.monotonic()
    while line not in _log(tmp_path):
        assert time.monotonic() < deadline, f"no {line!r} in time:\n{_log(tmp_path)[-3000:]}"
        assert proc.poll() is None or line in _log(tmp_path), _log(tmp_path)[-3000:]
        time.sleep(0.2)
    return time.monotonic() - start
