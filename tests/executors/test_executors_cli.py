"""Recipe files on the command line (in-process): overrides, --dryrun, sweeps listed, bad input -> exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from recipes import hf_auto_model_for_causal_lm as hf_recipe
from recipes.cli import main
from tests.helpers import recorded_io, require_module, train_losses

PWNED = Path("/tmp/nemo-automodel-pwned")


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``recipes/hf_auto_model_for_causal_lm.py ARGS`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["hf_auto_model_for_causal_lm.py", *args])
    try:
        main(hf_recipe.finetune_recipe)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def _home(nemorun_home):
    PWNED.unlink(missing_ok=True)
    yield
    assert not PWNED.exists(), "a shell metacharacter was executed"


def test_dryrun_prints_the_overridden_graph(monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "trainer.max_steps=5", "peft=None", "model.model_id=/models/x",
                         "optim.optimizer_fn.lr=3e-4", "trainer.strategy=ddp", "--dryrun")
    assert code == 0, err
    assert "max_steps=5" in out and "'/models/x'" in out and "lr=0.0003" in out and "strategy='ddp'" in out
    assert "LoRA(" not in out


def test_peft_factory_by_name_with_arguments(monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "--factory", "hf_auto_model_for_causal_lm(peft_scheme=None)",
                         "peft=lora", "peft.dim=4", "--dryrun")
    assert code == 0, err
    assert "LoRA(" in out and "dim=4" in out
    code, out, err = cli(monkeypatch, capsys, "peft=lora(dim=2, alpha=4)", "--dryrun")
    assert code == 0, err
    assert "dim=2" in out and "alpha=4" in out


def test_sweep_dryrun_lists_the_cartesian_product(monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "optim.optimizer_fn.lr=[1e-4,3e-4]", "peft.dim=[8,16]", "--dryrun")
    assert code == 0, err
    assert "sweep of 4 tasks" in out
    for name in ("lr-1e-4_dim-8", "lr-1e-4_dim-16", "lr-3e-4_dim-8", "lr-3e-4_dim-16"):
        assert name in out and f"finetune-{name}" in out  # each task writes to its own run dir


def test_slurm_dryrun_prints_the_sbatch_script(monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "executor=slurm", "executor.nodes=2", "executor.ntasks_per_node=2",
                         "executor.partition=debug", "--name", "multi", "--dryrun")
    assert code == 0, err
    for line in ("#!/bin/bash", "#SBATCH --nodes=2", "#SBATCH --partition=debug", "#SBATCH --job-name=root-root.multi"):
        assert line in out
    assert "torchrun" in out and "--nnodes 2 --nproc-per-node 2" in out and "nemo_run.core.runners.fdl_runner" in out
    # NeMo-Run's own spelling works too
    code, out, _ = cli(monkeypatch, capsys, "run.executor=local(ntasks_per_node=2)", "--dryrun")
    assert code == 0 and "torchrun" in out and "LocalExecutor request" in out


def test_shell_metacharacters_in_sweep_values_stay_data(monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, f"log.name=['a$(touch {PWNED})',b]", "executor=slurm", "--dryrun")
    assert code == 0, err
    assert "sweep of 2 tasks" in out and "log.name-a_touch" not in out
    assert "#SBATCH --job-name=root-root.name-a_touch_tmp_nemo-automodel-pwned" in out


@pytest.mark.parametrize("args,message", [
    (["executor=kubernetes"], "executor='kubernetes' is unknown: use one of local, docker, slurm"),
    (["executor=slurm", "executor.nodez=2"], "has no argument 'nodez'; did you mean nodes?"),
    (["executor=slurm", "executor.nodes=0"], "nodes=0 is invalid"),
    (["--factory", "llama3_8b"], "--factory 'llama3_8b' is unknown: use one of hf_auto_model_for_causal_lm"),
    (["trainer.max_stepz=5"], "trainer (Trainer) has no argument 'max_stepz'; did you mean max_steps"),
    (["trainer.max_steps=five"], "Failed to parse 'five'"),
    (["peft=None", "peft.dim=4"], "peft is None, which has no attribute 'dim' (set peft=… first)"),
    (["optim.optimizer_fn.lr=[1e-4,,3e-4]"], "empty item between commas"),
    (["optim.optimizer_fn.lr=[1e-4,3e-4"], "malformed"),
    (["--name", f"job$(touch {PWNED})"], "--name='job$(touch /tmp/nemo-automodel-pwned)' is invalid"),
    (["--name", "a;b"], "is invalid"),
    (["--no-such-flag"], "unknown option '--no-such-flag'"),
    (["executors=slurm"], "has no argument 'executors'"),
])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, args, message):
    code, out, err = cli(monkeypatch, capsys, *args, "--dryrun")
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]


def test_no_executor_trains_in_this_process(monkeypatch, capsys, tiny_llama, chat_file, tmp_path):
    from tests.executors.cli_helpers import tiny_args

    with recorded_io(all_threads=True) as events:
        code, out, err = cli(monkeypatch, capsys, *tiny_args(tiny_llama, chat_file, tmp_path, "direct"),
                             "optim.optimizer_fn.lr=1e-2", "--yes")
    assert code == 0, err
    assert [target for event, target in events if event == "subprocess.Popen"] == []  # no job was launched
    assert (tmp_path / "direct" / "checkpoints" / "last" / "hf_adapter").is_dir()
    losses = train_losses(tmp_path / "direct")  # at lr 1e-2: 10.77 -> 10.35 in 3 steps
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_the_nemo_command_finds_our_entry_points(tmp_path):
    from tests.executors.cli_helpers import explain, run_cli

    nemo = [str(Path(sys.executable).parent / "nemo"), "automodel", "finetune"]
    proc = run_cli("--factory", "smollm2_135m", "trainer.max_steps=5", "peft=None", "executor=slurm",
                   "executor.nodes=2", "trainer.strategy=fsdp2_parallel(tensor_parallel_size=2)", "--dryrun",
                   exe=nemo, cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert "max_steps=5" in proc.stdout and "#SBATCH --nodes=2" in proc.stdout
    # the argument factory builds the strategy node (it stayed the text 'fsdp2_parallel(...)' before)
    assert "strategy=FSDP2Strategy(" in proc.stdout and "mesh (dp=1, tp=2) over 2 ranks" in proc.stdout
    proc = run_cli("--factory", "nope", "--dryrun", exe=nemo, cwd=tmp_path)
    assert proc.returncode == 2 and "error: --factory 'nope' is unknown" in proc.stderr, explain(proc)


def test_megatron_factory_dryrun_shows_the_swapped_graph(monkeypatch, capsys):
    require_module("megatron.core", "the megatron extra is not installed")
    code, out, err = cli(monkeypatch, capsys, "--factory",
                         "hf_auto_model_for_causal_lm_megatron(tensor_parallel=2, num_gpus_per_node=2)",
                         "optim.config.lr=3e-4", "--dryrun")
    assert code == 0, err
    assert "MegatronGPTModel(" in out and "tensor_model_parallel_size=2" in out and "lr=0.0003" in out
