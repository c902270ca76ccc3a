"""SlurmExecutor on the real local cluster (slurmctld + slurmd + slurmdbd): train, fail, cancel, quoting."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import nemo_run as run
import pytest

import executors
from nemo_automodel.launch.experiment import Experiment, JobFailed
from tests.executors import jobs
from tests.executors.cli_helpers import ROOT, adapter, assert_bitwise_equal, explain, run_cli, tiny_args

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
PWNED = Path("/tmp/nemo-automodel-pwned-slurm")


def _sacct(*select: str) -> str:
    """``JobName|State`` rows of the jobs ``select`` picks (``--name N`` or ``-j ID``) from the last hour."""
    return subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobName,State", *select, "-S", "now-1hour"],
                          capture_output=True, text=True).stdout


def _eventually(check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.mark.distributed
def test_recipe_file_on_slurm_with_two_torchrun_ranks(slurm_cluster, tiny_llama, chat_file, tmp_path, nemorun_home,
                                                      local_ddp_adapter):
    out = tmp_path / "runs"
    proc = run_cli(*tiny_args(tiny_llama, chat_file, out, "slurm-ddp"), "executor=slurm",
                   "executor.ntasks_per_node=2", "executor.time=00:10:00", "trainer.strategy=ddp",
                   "--name", "slurm-ddp", "--yes")
    assert proc.returncode == 0, explain(proc)
    last = out / "slurm-ddp" / "checkpoints" / "last"
    assert json.loads((last / "meta.json").read_text())["step"] == 3
    assert (last / "trainer-rank0.pt").is_file() and (last / "trainer-rank1.pt").is_file()
    logs = list((nemorun_home / "experiments" / "slurm-ddp").glob("*/slurm-ddp/log-*.out"))
    assert len(logs) == 1, logs
    text = logs[0].read_text()
    assert "[default0]:" in text and "[default1]:" in text  # both torchrun ranks wrote to the job log
    assert _eventually(lambda: "root-root.slurm-ddp|COMPLETED" in _sacct("--name", "root-root.slurm-ddp"))
    assert_bitwise_equal(adapter(out / "slurm-ddp"), local_ddp_adapter)  # the same training as a local run


def test_a_failing_slurm_job_exits_1_and_shows_its_log(slurm_cluster, chat_file, tmp_path, nemorun_home):
    proc = run_cli(*tiny_args(tmp_path / "no-such-model", chat_file, tmp_path / "runs", "bad"), "executor=slurm",
                   "--name", "slurm-bad", "--yes")
    assert proc.returncode == 1, explain(proc)
    assert "error: 1 task(s) failed (slurm-bad: FAILED)" in proc.stderr
    assert "last lines of slurm-bad's log" in proc.stderr and "log-root-root.slurm-bad" in proc.stderr
    assert "is not a model folder" in proc.stderr  # the job's own error, from the Slurm log file


def _lagging_sacct(bin_dir: Path, seconds: float) -> None:
    """Put a ``sacct`` first on PATH that, for ``seconds``, answers like one whose slurmdbd has no row yet."""
    real = subprocess.run(["which", "sacct"], capture_output=True, text=True, check=True).stdout.strip()
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(
        "#!/bin/sh\n"
        f"if [ \"$(date +%s)\" -lt {int(time.time() + seconds)} ]; then echo 'JobID|JobName|State'; exit 0; fi\n"
        f'exec {real} "$@"\n')
    (bin_dir / "sacct").chmod(0o755)


@pytest.mark.parametrize("accounting_lag", [0, 6], ids=["in-sync", "sacct-lags"])
def test_experiment_api_cancel_from_another_handle(slurm_cluster, nemorun_home, accounting_lag, tmp_path, monkeypatch):
    if accounting_lag:  # CI once saw the cancel skipped: NeMo-Run cancels only jobs sacct already lists
        _lagging_sacct(tmp_path / "bin", accounting_lag)
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    exp = Experiment("cancel-me", executor=executors.slurm(env_vars={"PYTHONPATH": str(ROOT)}))
    exp.add(run.Partial(jobs.sleep, 600), name="sleeper")
    states = exp.run(detach=True)
    assert states["sleeper"] in ("SUBMITTED", "PENDING", "RUNNING"), states
    job_id = exp.status_details()["sleeper"]["job_id"]
    try:
        again = Experiment.from_id(exp.id)  # as another process would
        again.cancel("sleeper")
        assert _eventually(lambda: again.status() == {"sleeper": "CANCELLED"}), again.status()
        # slurmctld hands the job record to slurmdbd asynchronously: the accounting row can lag squeue
        assert _eventually(lambda: "|CANCELLED" in _sacct("-j", job_id)), _sacct("-j", job_id)
        with pytest.raises(JobFailed, match="sleeper: CANCELLED"):
            again.raise_for_failures()
    finally:
        subprocess.run(["scancel", job_id])  # a failed check must not leave a 10-minute job holding the node


def test_metacharacters_in_arguments_and_env_are_passed_literally(slurm_cluster, tmp_path, nemorun_home):
    PWNED.unlink(missing_ok=True)
    weird = f"$(touch {PWNED}); `touch {PWNED}` 'q' \"dq\" a b"
    target = tmp_path / "env $(id) `id` ;&|.json"  # a literal file name (no '/': that would make folders)
    exp = Experiment("quoting", executor=executors.slurm(env_vars={"PYTHONPATH": str(ROOT), "WEIRD": weird}))
    exp.add(run.Partial(jobs.write_env, str(target), ["WEIRD"]), name="quoting")
    exp.run()
    assert json.loads(target.read_text()) == {"WEIRD": weird}
    assert not PWNED.exists()
