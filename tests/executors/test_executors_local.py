"""LocalExecutor end to end: a recipe file under torchrun with 2 ranks, a sweep, and the Experiment API."""

from __future__ import annotations

import json
import os

import nemo_run as run
import pytest

import executors
from nemo_automodel.launch.experiment import Experiment, JobFailed
from tests.executors import jobs
from tests.executors.cli_helpers import ROOT, explain, run_cli, tiny_args

pytestmark = [pytest.mark.slow]


@pytest.mark.distributed
def test_recipe_file_on_local_torchrun_with_two_ranks(tiny_llama, chat_file, tmp_path, nemorun_home):
    out = tmp_path / "runs"
    proc = run_cli(*tiny_args(tiny_llama, chat_file, out, "ddp"), "executor=local", "executor.ntasks_per_node=2",
                   "trainer.strategy=ddp", "--name", "local-ddp", "--yes")
    assert proc.returncode == 0, explain(proc)
    last = out / "ddp" / "checkpoints" / "last"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == 3 and meta["peft"] is True
    assert (last / "trainer-rank0.pt").is_file() and (last / "trainer-rank1.pt").is_file()  # 2 ranks saved
    assert "local-ddp: SUCCEEDED" in proc.stdout
    logs = list((nemorun_home / "experiments" / "local-ddp").glob("*/local-ddp/**/combined.log"))
    assert logs and "nproc_per_node=2" in logs[0].read_text()


def test_sweep_runs_the_product_in_parallel_and_writes_a_summary(tiny_llama, chat_file, tmp_path, nemorun_home):
    out, summary = tmp_path / "runs", tmp_path / "summary.md"
    proc = run_cli(*tiny_args(tiny_llama, chat_file, out, "sw", steps=2), "optim.optimizer_fn.lr=[1e-4,1e-2]",
                   "peft.dim=[4]", "run.sequential=False", f"run.summary={summary}", "--name", "sweep", "--yes")
    assert proc.returncode == 0, explain(proc)
    table = summary.read_text().splitlines()
    assert len(table) == 2 + 2 and "train_loss" in table[0] and "optim.optimizer_fn.lr" in table[0]
    for name in ("lr-1e-4_dim-4", "lr-1e-2_dim-4"):
        row = next(line for line in table if line.startswith(f"| {name} "))
        assert "SUCCEEDED" in row and str(out / f"sw-{name}") in row
        assert (out / f"sw-{name}" / "checkpoints" / "last" / "meta.json").is_file()
    assert "final metrics" in proc.stdout and table[0] in proc.stdout


def test_sweep_with_shell_metacharacters_in_values_runs_them_as_data(tiny_llama, chat_file, tmp_path, nemorun_home):
    """Executed for real (not --dryrun): a sweep value that is a shell command becomes a run name, nothing more."""
    marker = tmp_path / "pwned"
    out = tmp_path / "runs"
    evil = f"a $(touch {marker}) `touch {marker}`; touch {marker}"
    proc = run_cli(*tiny_args(tiny_llama, chat_file, out, "sw", steps=1), f"log.name=['{evil}',b]",
                   "--name", "quoting", "--yes")
    assert proc.returncode == 0, explain(proc)
    assert "SUCCEEDED" in proc.stdout and "FAILED" not in proc.stdout
    assert (out / evil / "checkpoints" / "last" / "meta.json").is_file()  # the literal value is the run's name
    assert not marker.exists(), "a shell metacharacter was executed"


def test_experiment_api_status_logs_and_failures(tmp_path, nemorun_home):
    env = {"PYTHONPATH": str(ROOT), "WEIRD": "a b; $(echo no)"}
    exp = Experiment("api", executor=executors.local(env_vars=env))
    exp.add(run.Partial(jobs.write_env, str(tmp_path / "env.json"), ["WEIRD", "PATH"]), name="env")
    exp.add(run.Partial(jobs.fail, "boom at step 7"), name="broken")
    assert exp.status() == {"env": "UNSUBMITTED", "broken": "UNSUBMITTED"}
    with pytest.raises(JobFailed) as failure:
        exp.run(sequential=True)
    message = str(failure.value)
    assert "broken: FAILED" in message and "RuntimeError: boom at step 7" in message and "env:" not in message
    assert exp.status() == {"env": "SUCCEEDED", "broken": "FAILED"}
    assert "about to fail: boom at step 7" in exp.logs("broken")
    seen = json.loads((tmp_path / "env.json").read_text())
    assert seen["WEIRD"] == "a b; $(echo no)" and seen["PATH"].split(os.pathsep)[0] == executors.venv_bin()
    assert "| env " in exp.summary() and "| broken " in exp.summary()
    with pytest.raises(Exception, match="twice"):
        exp.add(run.Partial(jobs.sleep, 1), name="env")
