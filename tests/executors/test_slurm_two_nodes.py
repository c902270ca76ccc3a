"""Two Slurm nodes for real (n1 and n2 of the local cluster, .ci/slurm-up.sh): one FSDP2 training across both
through our SlurmExecutor and the Experiment API, against one process (with both nodes' logs); and one job hit by
faults at random moments on both nodes (workers killed and restarted by torchrun, a node lost and the job requeued,
a preemption checkpointed and requeued), resuming bitwise equal to the uninterrupted run after each.

Every run is full SFT of the tiny Llama with plain SGD (unclipped, so a wrong gradient scale shows in the
weights; tests/distributed/harness.py `assert_sgd_equal`), ``STEPS`` steps, a checkpoint every 2 (every step in the
fault test)."""

from __future__ import annotations

import functools
import io
import json
import os
import random
import re
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
STEPS = 14  # 16 rows / global batch 4: the run crosses epoch boundaries; room for 6 faults, each 1 or 2 steps on
LR = 0.1
#: The fault test's seed (NEMO_AUTOMODEL_FAULT_SEED picks others, held-out style); node and step of each fault come
#: from it. A "worker" kill is survived by torchrun's restart (max_restarts) inside the allocation, a "node" kill
#: (its torchrun too) ends the job, which requeues itself; "preempt" is `scancel --signal=TERM` to the job.
SEED = int(os.environ.get("NEMO_AUTOMODEL_FAULT_SEED", "25"))
FAULTS = ("worker", "worker", "worker", "worker", "node", "preempt")  # 5 kills at random moments, then a preemption


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


def _two_nodes(env_vars: dict[str, str] | None = None, **kw) -> run.SlurmExecutor:
    return executors.slurm(nodes=2, ntasks_per_node=1, launcher="torchrun", time="00:10:00",
                           env_vars={"PYTHONPATH": str(ROOT), **(env_vars or {})}, **kw)


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
            (root / "logs.txt").write_text(exp.logs("train", lines=5))  # what a user sees: both nodes' last lines
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
    # each node logs to a file of its own in the job folder, and Experiment.logs shows both
    logs = (two_node_run / "logs.txt").read_text()
    per_node = [Path(line[1:-1]) for line in logs.splitlines() if line.startswith("[/") and line.endswith("]")]
    assert [p.name for p in per_node] == [f"log-root-root.train_{job_id}_0_node{i}.out" for i in (0, 1)], logs
    # torchrun's rendezvous hands out the global ranks in the order the nodes join: one rank in each file
    assert sorted(re.findall(r"global_ranks=\[(\d)\]", "".join(p.read_text() for p in per_node))) == ["0", "1"]
    init = load_file(tiny_llama / "model.safetensors")
    got, ref = _weights(run_dir), _weights(one_process_run)
    assert_sgd_equal(got, ref, {k: init[k] for k in ref}, "2 Slurm nodes x 1 process, FSDP2")


def _processes(job_id: str, node: str, whole_task: bool = False) -> list:
    """The training processes (torchrun's workers) of Slurm job ``job_id`` on ``node``; with ``whole_task``, their
    torchrun first (all that a lost node takes with it)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURMD_NODENAME") == node and "LOCAL_RANK" in env:
            found.append(p)
    return ([found[0].parent()] if whole_task and found else []) + found


def _wait(check, timeout: float, what: str, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def _rank0_rows(journal: Path) -> list[dict]:
    """Rank 0's rows of the `StepJournal` (complete lines only)."""
    text = journal.read_text() if journal.is_file() else ""
    return [row for line in text.splitlines() if line.endswith("}") and (row := json.loads(line))["rank"] == 0]


def _new_rows(journal: Path, old_pids: frozenset, step: int = 1) -> list[dict]:
    """Rank 0's rows of the current attempt (a process not in ``old_pids``), once it reached ``step``."""
    rows = [r for r in _rank0_rows(journal) if r["pid"] not in old_pids]
    return rows if rows and rows[-1]["step"] >= step else []


def _checkpointed(run_dir: Path, step: int) -> bool:
    """Whether the newest complete checkpoint (``checkpoints/last``) is ``step`` or later."""
    last = run_dir / "checkpoints" / "last"
    return last.is_symlink() and int(os.readlink(last).rpartition("-")[2]) >= step


def test_kills_on_both_nodes_and_a_preemption_each_resume_bitwise(two_node_run, tiny_llama, chat_file, tmp_path,
                                                                  nemorun_home):
    from tests.executors.jobs import StepJournal

    run_dir, journal = tmp_path / "runs" / "two-nodes", tmp_path / "journal.jsonl"
    reference = {r["step"]: r["train_loss"] for r in map(json.loads, (two_node_run / "runs" / "two-nodes" /
                                                                     "metrics.jsonl").read_text().splitlines())}
    # torchrun SIGKILLs a worker still alive this long after its SIGTERM (default 30 s): a survivor blocked in a
    # collective with a killed peer sometimes is; the tiny model's preemption checkpoint takes well under a second
    executor = _two_nodes(requeue=True, max_requeues=FAULTS.count("node") + FAULTS.count("preempt"),
                          max_restarts=FAULTS.count("worker"), env_vars={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "10"})
    recipe = _recipe(tiny_llama, chat_file, tmp_path / "runs", "two-nodes", "fsdp2")
    recipe.trainer.callbacks = [run.Config(StepJournal, path=str(journal))]
    recipe.log.ckpt.every_n_train_steps = 1  # a checkpoint after every step: each fault resumes from one
    exp = Experiment("faults", executor=executor)
    exp.add(recipe, name="train")
    exp.run(detach=True)
    job_id = exp.status_details()["train"]["job_id"]
    rng = random.Random(SEED)
    plan = [(kind, rng.choice(["n1", "n2"]) if kind != "preempt" else "n1+n2", rng.randint(1, 2)) for kind in FAULTS]
    print(f"seed {SEED}: faults (kind, node, steps past the attempt's resume point): {plan}")
    table, old_pids, resume = [], set(), 0
    try:
        for kind, node, ahead in plan:
            # each fault strikes once the attempt checkpointed `target`, while it trains the next step
            target = resume + ahead  # each fault advances the resume point by `ahead`: at most 12 in all
            _wait(functools.partial(_checkpointed, run_dir, target), 300,
                  f"checkpoint {target} before the {kind} fault")
            started = time.monotonic()
            if kind == "preempt":  # every step's processes on both nodes; not the batch script, which requeues
                subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
            else:
                victims = _processes(job_id, node, whole_task=kind == "node")
                assert victims, f"no training process of job {job_id} on {node}"
                for p in victims:
                    p.send_signal(signal.SIGKILL)
            rows = _rank0_rows(journal)
            at = max(r["step"] for r in rows if r["pid"] not in old_pids)  # rank 0's last finished step
            assert at < STEPS, f"the run reached step {at} before the {kind} fault: nothing left to resume"
            old_pids |= {r["pid"] for r in rows}
            first = _wait(functools.partial(_new_rows, journal, frozenset(old_pids)), 300,
                          f"the attempt after the {kind} fault on {node}")[0]
            resume = first["step"] - 1
            table.append({"fault": kind, "node": node, "after_step": at, "resumed_from": resume,
                          "seconds": round(time.monotonic() - started, 1),
                          "bitwise": first["loss"] == reference[resume + 1]})
            print(table[-1])
            if kind == "preempt":  # every rank finished its step and saved it: nothing is redone
                assert resume >= at, table[-1]
            else:  # the newest checkpoint: the one awaited or a later one, none past the last finished step
                assert target <= resume <= at, table[-1]
        _wait(lambda: exp.status()["train"] in ("SUCCEEDED", "FAILED", "CANCELLED"), 300, "the last attempt", poll=1.0)
    finally:
        subprocess.run(["scancel", job_id])
    log = _job_log(exp, "train")
    assert exp.status() == {"train": "SUCCEEDED"}, log[-4000:]
    # what each fault did: torchrun restarted the killed workers, the lost node and the preemption requeued the job
    assert log.count("will restart worker group") >= FAULTS.count("worker"), log[-4000:]
    assert "requeued (restart 1 of at most 2)" in log and "requeued (restart 2 of at most 2)" in log, log[-4000:]
    preempted = table[FAULTS.index("preempt")]
    assert f"SIGTERM: stopped after step {preempted['resumed_from']} (checkpointed: True); exiting with 75" in log
    # every step of every attempt, each resume's first included, has the uninterrupted run's loss, bit for bit
    rows = _rank0_rows(journal)
    assert [r["step"] for r in rows if r["loss"] != reference[r["step"]]] == []
    assert all(f["bitwise"] for f in table) and len(table) == len(FAULTS), table
    assert _meta(run_dir)["step"] == STEPS
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
    assert "_node%n.out" in proc.stdout  # one log per node
    assert ": nodes n1, n2; torchrun rendezvous on n1 at 127.0.0.1:29500 (its NodeAddr)" in proc.stdout, proc.stdout
