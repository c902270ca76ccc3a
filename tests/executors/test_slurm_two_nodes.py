"""Two Slurm nodes for real (n1 and n2 of the local cluster, .ci/slurm-up.sh): one FSDP2 training across both
through our SlurmExecutor and the Experiment API, against one process; and a node's worker killed mid-run,
the job requeued and resumed from its last verified checkpoint, bitwise equal to the uninterrupted run.

Every run is full SFT of the tiny Llama with plain SGD (unclipped, so a wrong gradient scale shows in the
weights; tests/distributed/harness.py `assert_sgd_equal`), ``STEPS`` steps, a checkpoint every 2."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nemo_run as run
import pytest

import executors
from nemo_automodel.launch.experiment import Experiment
from tests.executors.cli_helpers import ROOT, assert_bitwise_equal, explain
from tests.parallel import shared_build

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]
STEPS = 8  # 16 rows / global batch 4: the run crosses an epoch boundary
LR = 0.1


def _recipe(model: Path, data: Path, out: Path, name: str, strategy: str | None) -> run.Partial:
    import torch

    from nemo_automodel.trainer.optim import PytorchOptimizerModule
    from recipes.hf_auto_model_for_causal_lm import finetune_recipe

    recipe = finetune_recipe(model_id=str(model), dataset=str(data), formatting="chat", peft_scheme=None,
                             dir=str(out), name=name, max_steps=STEPS, seq_length=64, micro_batch_size=2,
                             global_batch_size=4, strategy=strategy, precision="32")  # CPU fp32: bitwise resume
    recipe.optim = run.Config(PytorchOptimizerModule, optimizer_fn=run.Partial(torch.optim.SGD, lr=LR))
    recipe.trainer.gradient_clip_val = None
    recipe.log.ckpt.every_n_train_steps = 2
    return recipe


def _two_nodes(**kw) -> run.SlurmExecutor:
    return executors.slurm(nodes=2, ntasks_per_node=1, launcher="torchrun", time="00:10:00",
                           env_vars={"PYTHONPATH": str(ROOT)}, **kw)


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / "last" / "model" / "model.safetensors")


def _meta(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())


def _job_log(exp: Experiment, name: str) -> str:
    """The batch script's trace (``sbatch_*.out``, ``set -x``) and the tasks' output of every attempt."""
    logs = sorted(exp.job_dir(name).glob("*.out"))
    assert logs, f"no Slurm log in {exp.job_dir(name)}"
    return "\n".join(p.read_text(errors="replace") for p in logs)


def _sacct(job_id: str, fields: str) -> str:
    return subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", fields], capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture(scope="session")
def two_node_run(slurm_two_nodes, tiny_llama, chat_file, tmp_path_factory) -> Path:
    """The uninterrupted 2-node FSDP2 run (one torchrun per node, 1 process each); its folder holds
    ``runs/two-nodes`` and ``job.log``, ``job_id``."""

    def build(root: Path) -> None:
        from nemo_run.config import get_nemorun_home, set_nemorun_home

        previous = get_nemorun_home(), os.environ.get("NEMORUN_HOME"), sys.stdin
        set_nemorun_home(str(root / "nemorun"))  # this run's job files, as the nemorun_home fixture does
        os.environ["NEMORUN_HOME"] = str(root / "nemorun")
        sys.stdin = io.StringIO()  # as the _no_stdin fixture does (a session fixture runs outside it)
        try:
            exp = Experiment("two-nodes", executor=_two_nodes())
            exp.add(_recipe(tiny_llama, chat_file, root / "runs", "two-nodes", "fsdp2"), name="train")
            exp.run()  # raises JobFailed with the log tail
            (root / "job.log").write_text(_job_log(exp, "train"))
            (root / "job_id").write_text(exp.status_details()["train"]["job_id"])
        finally:
            set_nemorun_home(previous[0])
            sys.stdin = previous[2]
            if previous[1] is None:
                os.environ.pop("NEMORUN_HOME", None)
            else:
                os.environ["NEMORUN_HOME"] = previous[1]

    return shared_build(tmp_path_factory, "slurm-two-node-run", build)


@pytest.fixture(scope="session")
def one_process_run(tiny_llama, chat_file, tmp_path_factory) -> Path:
    """The same recipe in one plain process (no torchrun, no strategy): the reference of the 2-node run."""
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    def build(root: Path) -> None:
        graph = ZlibJSONSerializer().serialize(_recipe(tiny_llama, chat_file, root / "runs", "one", None))
        proc = subprocess.run([sys.executable, "-m", "nemo_run.core.runners.fdl_runner", "-n", "one", graph],
                              capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                   "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, explain(proc)

    return shared_build(tmp_path_factory, "slurm-one-process-run", build) / "runs" / "one"


def test_a_two_node_fsdp2_job_equals_one_process(two_node_run, one_process_run, tiny_llama):
    from safetensors.torch import load_file

    if str(ROOT / "tests" / "distributed") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests" / "distributed"))
    from harness import assert_sgd_equal  # the tolerance tests/distributed uses for FSDP2 vs one process

    run_dir = two_node_run / "runs" / "two-nodes"
    job_id = (two_node_run / "job_id").read_text()
    # one job on both nodes; its training step ran one task per node
    assert _sacct(job_id, "NodeList,NNodes,State") == "n[1-2]|2|COMPLETED"
    log = (two_node_run / "job.log").read_text()
    # the rendezvous is on the first node of the allocation, at its NodeAddr (loopback here)
    assert "+ head_node=n1" in log and "+ head_node_addr=127.0.0.1" in log, log[-3000:]
    assert "--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29500" in log and "--nnodes 2 --nproc-per-node 1" in log
    # both ranks (one per node) wrote their shards into the same checkpoint folder
    last = run_dir / "checkpoints" / "last"
    meta = _meta(run_dir)
    assert (meta["step"], meta["world_size"]) == (STEPS, 2)
    assert sorted(p.name for p in (last / "state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (last / "trainer-rank0.pt").is_file() and (last / "trainer-rank1.pt").is_file()
    init = load_file(tiny_llama / "model.safetensors")
    got, ref = _weights(run_dir), _weights(one_process_run)
    assert_sgd_equal(got, ref, {k: init[k] for k in ref}, "2 Slurm nodes x 1 process, FSDP2")


def _workers(job_id: str, node: str) -> list:
    """The training processes (torchrun workers) of Slurm job ``job_id`` on ``node``."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURMD_NODENAME") == node and "LOCAL_RANK" in env:
            found.append(p)
    return found


def _wait(check, timeout: float, what: str, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def test_node_loss_mid_run_fails_fast_then_the_requeued_job_resumes_bitwise(two_node_run, tiny_llama, chat_file,
                                                                           tmp_path, nemorun_home):
    run_dir = tmp_path / "runs" / "two-nodes"
    exp = Experiment("node-loss", executor=_two_nodes(requeue=True, max_requeues=1))
    exp.add(_recipe(tiny_llama, chat_file, tmp_path / "runs", "two-nodes", "fsdp2"), name="train")
    exp.run(detach=True)
    job_id = exp.status_details()["train"]["job_id"]
    kill_after = random.choice([3, 4, 5])  # any step after the first checkpoint (2): the resume must not care
    try:
        def logged_step() -> int:  # the last step rank 0 logged, once it is kill_after or later
            metrics = run_dir / "metrics.jsonl"
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
                if metrics.is_file() else []
            steps = [r["step"] for r in rows if "step" in r]
            return max(steps) if steps and max(steps) >= kill_after else 0

        _wait(logged_step, 300, f"step {kill_after} of the first attempt")
        victims = _wait(lambda: _workers(job_id, "n2"), 10, "the worker on n2")
        killed_at, step_seen = time.monotonic(), logged_step()
        for p in victims:
            p.send_signal(signal.SIGKILL)
        assert step_seen < STEPS, f"the run reached step {step_seen} before the kill: nothing left to resume"
        # the failed attempt ends (srun --kill-on-bad-exit takes n1 down too) and the batch script requeues it
        requeued = _wait(lambda: "requeued (restart 1 of at most 1)" in _job_log(exp, "train"), 120,
                         "the requeue after the kill")
        assert requeued
        print(f"kill at step {step_seen} -> requeue after {time.monotonic() - killed_at:.1f}s")
        _wait(lambda: exp.status()["train"] in ("SUCCEEDED", "FAILED", "CANCELLED"), 400, "the requeued run",
              poll=1.0)
    finally:
        subprocess.run(["scancel", job_id])
    log = _job_log(exp, "train")
    assert exp.status() == {"train": "SUCCEEDED"}, log[-4000:]
    assert "Signal 9 (SIGKILL)" in log or "exitcode  : -9" in log, log[-4000:]  # torchrun names the dead worker
    meta = _meta(run_dir)
    assert meta["step"] == STEPS
    assert 2 <= meta["resumed_from"] <= step_seen and meta["resumed_from"] % 2 == 0, meta  # a checkpoint's step
    assert_bitwise_equal(_weights(run_dir), _weights(two_node_run / "runs" / "two-nodes"))


def test_dryrun_inside_a_two_node_allocation_names_the_nodes(slurm_two_nodes, tiny_llama, chat_file, tmp_path):
    from tests.executors.cli_helpers import run_cli, tiny_args

    # the command of the issue, on the tiny model: `salloc -N2` runs it here with the allocation's variables
    proc = run_cli(*tiny_args(tiny_llama, chat_file, tmp_path / "runs", "dry"), "executor=slurm", "executor.nodes=2",
                   "executor.ntasks_per_node=1", "trainer.strategy=fsdp2", "--dryrun",
                   exe=["salloc", "-N2", "--time=00:05:00", sys.executable, str(ROOT / "recipes" / "hf_auto_model_for_causal_lm.py")],
                   env={"NEMORUN_HOME": str(tmp_path / "nemorun")})
    assert proc.returncode == 0, explain(proc)
    assert "#SBATCH --nodes=2" in proc.stdout and "--nnodes 2 --nproc-per-node 1" in proc.stdout
    assert "head_node_addr=$(scontrol show node" in proc.stdout  # the rendezvous address the job will take
    assert ": nodes n1, n2; torchrun rendezvous on n1 at 127.0.0.1:29500 (its NodeAddr)" in proc.stdout, proc.stdout
