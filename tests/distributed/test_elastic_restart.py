"""Elastic restart inside one job: with ``executors.local(max_restarts=1)``'s environment, torchrun restarts both
workers after one is SIGKILLed mid-run; they resume from the last checkpoint and end bitwise equal to the
uninterrupted run (the `fsdp2` fixture's). The same on two Slurm nodes: tests/executors/test_slurm_two_nodes.py."""

from __future__ import annotations

import random
import signal
import subprocess

import pytest
import torch
from harness import ROOT, command, env, losses, max_diff, meta, wait_for_step, worker_process, write_spec

import executors

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
SEED = 7


def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_bitwise(config, fsdp2, tmp_path):
    elastic = {k: v for k, v in executors.local(ntasks_per_node=2, max_restarts=1).env_vars.items()
               if k.startswith(("PET_", "TORCH"))}  # what the executor gives torchrun: PET_MAX_RESTARTS=1, ...
    assert elastic["PET_MAX_RESTARTS"] == "1", elastic
    run = {**config["fsdp2-sft"], "log_dir": str(tmp_path / "runs"), "name": "elastic", "every": 1, "resume": True,
           "out": str(tmp_path / "out")}
    run_dir = tmp_path / "runs" / "elastic"
    rng = random.Random(SEED)
    rank, target = rng.choice([0, 1]), rng.randint(2, 5)
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        proc = subprocess.Popen(command(write_spec(tmp_path / "spec.json", [run]), 2), cwd=ROOT,
                                env={**env(), **elastic}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            seen = wait_for_step(proc, run_dir, target)
            victim = worker_process(proc, rank)
            victim.send_signal(signal.SIGKILL)
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    print(f"seed {SEED}: SIGKILL to rank {rank} after step {seen} was logged")
    assert code == 0, text[-3000:]
    assert f"failed (exitcode: -9) local_rank: {rank}" in text, text[-3000:]  # torchrun saw the kill, restarted
    resumed = meta(run_dir)["resumed_from"]
    assert 1 <= resumed <= seen, resumed  # the restarted workers started from a checkpoint, not from scratch
    assert text.count(f"resumed from {run_dir / 'checkpoints'}") == 1, text[-3000:]
    assert max_diff(torch.load(tmp_path / "out" / "final.pt", weights_only=True),
                    torch.load(fsdp2 / "sft-full" / "final.pt", weights_only=True)) == 0.0
    assert losses(run_dir) == losses(fsdp2 / "runs" / "sft-full")
