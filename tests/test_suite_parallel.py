"""The suite's own parallel machinery (tests/parallel.py): the cores lock and the once-per-run builds."""

from __future__ import annotations

import fcntl

import pytest

from tests.parallel import cpu_share, shared_build


def _can_take(lock_file, mode: int) -> bool:
    with open(lock_file, "a") as handle:  # a second open file: flock treats it as another holder
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def test_one_process_starting_test_at_a_time(tmp_path):
    lock = tmp_path / "processes.lock"
    with cpu_share(tmp_path, starts_processes=True, alone=False):
        assert not _can_take(lock, fcntl.LOCK_EX)
        with cpu_share(tmp_path, starts_processes=False, alone=False):  # a single-process test does not wait
            pass
    assert _can_take(lock, fcntl.LOCK_EX)  # released


def test_alone_a_process_starting_test_holds_both_cores(tmp_path):
    lock = tmp_path / "cpu.lock"
    with cpu_share(tmp_path, starts_processes=False, alone=True):
        assert _can_take(lock, fcntl.LOCK_SH) and not _can_take(lock, fcntl.LOCK_EX)  # two share, none alone
    with cpu_share(tmp_path, starts_processes=True, alone=True):
        assert not _can_take(lock, fcntl.LOCK_SH) and not _can_take(lock, fcntl.LOCK_EX)
    assert _can_take(lock, fcntl.LOCK_EX)  # released


def test_shared_build_builds_once_and_redoes_a_build_that_died(tmp_path_factory):
    calls = []

    def build(out):
        calls.append(out)
        (out / "weights").write_text(str(len(calls)))

    first = shared_build(tmp_path_factory, "suite-once", build)
    assert shared_build(tmp_path_factory, "suite-once", build) == first and len(calls) == 1

    def dies(out):
        (out / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        shared_build(tmp_path_factory, "suite-died", dies)
    again = shared_build(tmp_path_factory, "suite-died", build)
    assert sorted(p.name for p in again.iterdir()) == [".built-by-the-suite", "weights"]  # the half build is gone
