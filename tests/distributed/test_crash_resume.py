"""Crash safety: SIGKILL at a random step, a save killed at four points of its write, SIGTERM preemption.

Each case is compared with an uninterrupted run of the same set-up from the session fixtures
(bitwise: the resumed run replays exactly the steps after its checkpoint).
"""

from __future__ import annotations

import random
import signal

import pytest
import torch
from harness import STEPS, kill_tree, launch, losses, max_diff, meta, start, wait_for_step
from safetensors.torch import load_file

from nemo_automodel.trainer import PREEMPTED_EXIT_CODE

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _load(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("seed,setup", [(0, "fsdp2-lora"), (1, "fsdp2-sft"), (2, "single-sft")])
def test_sigkill_at_random_step_then_resume_equals_uninterrupted(seed, setup, config, fsdp2, single, tmp_path):
    strategy, kind = setup.split("-")
    reference = (fsdp2 if strategy == "fsdp2" else single) / f"{kind}-full"
    nproc = 2 if strategy == "fsdp2" else 1
    run = {**config[setup], "log_dir": str(tmp_path / "runs"), "name": "killed", "every": 1}
    run_dir = tmp_path / "runs" / "killed"

    target = random.Random(seed).randint(2, STEPS - 2)
    proc = start(tmp_path, [run], nproc)
    wait_for_step(proc, run_dir, target)
    kill_tree(proc, signal.SIGKILL)  # the whole process tree, like a node loss
    logged, saved = len(losses(run_dir)), meta(run_dir)["step"]
    print(f"seed {seed}: killed after step {logged} was logged; last complete checkpoint: step {saved}")
    assert 1 <= saved <= logged < STEPS

    launch(tmp_path, [{**run, "resume": True, "out": str(tmp_path / "out")}], nproc)
    assert meta(run_dir)["resumed_from"] == saved  # the resumed process started at the step after it
    assert max_diff(_load(tmp_path / "out" / "final.pt"), _load(reference / "final.pt")) == 0.0
    assert losses(run_dir) == losses(reference.parent / "runs" / f"{kind}-full")  # each step logged once


# where the kill leaves checkpoint 4: (folder, its DCP state complete, its meta.json written)
TORN = {"dcp": (".tmp-step-000004", False, False), "export": (".tmp-step-000004", True, False),
        "rename": (".tmp-step-000004", True, True), "last": ("step-000004", True, True)}


@pytest.mark.parametrize("point", TORN)
def test_save_killed_mid_write_never_becomes_last(config, fsdp2, tmp_path, point):
    run = {**config["fsdp2-lora"], "log_dir": str(tmp_path / "runs"), "name": "torn", "every": 1}
    ckpts = tmp_path / "runs" / "torn" / "checkpoints"
    died = launch(tmp_path, [{**run, "kill_in_save_at": 4, "kill_point": point}], check=False)
    assert died.returncode != 0
    folder, state_done, marked = TORN[point]
    torn = ckpts / folder
    assert torn.is_dir() and (torn / "state" / ".metadata").is_file() == state_done
    assert (torn / "meta.json").exists() == marked
    assert (ckpts / "last").resolve().name == "step-000003" and meta(ckpts.parent)["step"] == 3

    launch(tmp_path, [{**run, "resume": True, "out": str(tmp_path / "out")}])
    assert meta(ckpts.parent)["resumed_from"] == 3  # the resumed process started at step 4
    assert max_diff(_load(tmp_path / "out" / "final.pt"), _load(fsdp2 / "lora-full" / "final.pt")) == 0.0
    assert (ckpts / "last").resolve().name == f"step-{STEPS:06d}"
    assert not list(ckpts.glob(".tmp-*"))  # the torn save was cleared by the next complete one


def test_sigterm_checkpoints_exits_75_and_resumes_with_trainer_launcher(config, ddp, tmp_path):
    """``Trainer(devices=2)`` from plain python starts 2 DDP workers; SIGTERM to it preempts them all."""
    run = {**config["ddp-sft"], "devices": 2, "log_dir": str(tmp_path / "runs"), "name": "preempted"}
    run_dir = tmp_path / "runs" / "preempted"
    proc = start(tmp_path, [run], nproc=1)
    seen = wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)  # to the launching process only: it forwards to the workers
    assert proc.wait(timeout=300) == PREEMPTED_EXIT_CODE
    saved = meta(run_dir)
    print(f"SIGTERM after step {seen} was logged; preemption checkpoint at step {saved['step']}")
    assert saved["preempted"] and saved["world_size"] == 2 and seen <= saved["step"] < STEPS

    done = launch(tmp_path, [{**run, "resume": True}], nproc=1)
    assert meta(run_dir)["resumed_from"] == saved["step"]
    assert f"RUN_DIR {run_dir}" in done.stdout  # fit() in the launching process returns rank 0's run dir
    exported = load_file(run_dir / "checkpoints" / "last" / "model" / "model.safetensors")
    reference = load_file(ddp / "runs" / "sft-full" / "checkpoints" / "last" / "model" / "model.safetensors")
    assert max_diff(exported, reference) == 0.0  # same as the uninterrupted torchrun DDP run, bitwise
    assert losses(run_dir) == losses(ddp / "runs" / "sft-full")
