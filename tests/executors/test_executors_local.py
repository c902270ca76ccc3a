"""LocalExecutor end to end: a recipe file under torchrun with 2 ranks, a sweep, and the Experiment API."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nemo_run as run
import pytest

import executors
from nemo_automodel.launch.experiment import Experiment, JobFailed
from tests.executors import jobs
from tests.executors.cli_helpers import ROOT, explain, run_cli, tiny_args
from tests.helpers import metrics

pytestmark = [pytest.mark.slow]


@pytest.mark.distributed
def test_recipe_file_on_local_torchrun_with_two_ranks(local_ddp_run):
    """The session's one local torchrun x2 DDP run of the recipe file (also the Slurm/Docker reference)."""
    run_dir, stdout, home = local_ddp_run
    last = run_dir / "checkpoints" / "last"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == 3 and meta["world_size"] == 2 and meta["peft"] is True
    assert (last / "trainer-rank0.pt").is_file() and (last / "trainer-rank1.pt").is_file()  # 2 ranks saved
    assert (last / "hf_adapter" / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]
    assert "local-ref: SUCCEEDED" in stdout
    logs = list((home / "experiments" / "local-ref").glob("*/local-ref/**/combined.log"))
    assert logs and "nproc_per_node=2" in logs[0].read_text()


@pytest.mark.distributed  # two training processes at once
def test_sweep_runs_the_product_in_parallel_and_writes_a_summary(tiny_llama, chat_file, tmp_path, nemorun_home):
    """In parallel: each job was launched (NeMo-Run makes its log folder then) before the other had trained."""
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
    launched, trained = zip(*(_launched_and_trained(nemorun_home / "experiments" / "sweep", out / f"sw-{name}", name)
                              for name in ("lr-1e-4_dim-4", "lr-1e-2_dim-4")))
    assert max(launched) < min(trained), (launched, trained)


def _launched_and_trained(experiment: Path, run_dir: Path, name: str) -> tuple[float, float]:
    """When a sweep job's process started (the mtime of its log folder, made with its three log files at
    launch) and when it wrote its last checkpoint."""
    logs = next(experiment.glob(f"*/{name}/nemo_run/*/{name}/0"))
    return logs.stat().st_mtime, (run_dir / "checkpoints" / "last" / "meta.json").stat().st_mtime


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
