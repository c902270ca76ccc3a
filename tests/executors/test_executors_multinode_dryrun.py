"""Multi-node launches on paper: `--dryrun` of 2 x 8 and 16 x 8 GPU Slurm jobs with TP=8 prints the sbatch
script, the torchrun rendezvous, the device mesh over the nodes and the memory plan per GPU (text only:
nothing is submitted or built). The recipe file runs as a user runs it (``python recipes/….py``)."""

from __future__ import annotations

import pytest

from tests.executors.cli_helpers import explain, run_cli

pytestmark = pytest.mark.slow  # a recipe file started as a process per launch


@pytest.fixture()
def model_dir(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=8, architectures=["LlamaForCausalLM"])
    cfg.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _dryrun(tmp_path, *args: str) -> str:
    proc = run_cli(*args, "--dryrun", cwd=tmp_path, env={"NEMORUN_HOME": str(tmp_path / "nemorun")})
    assert proc.returncode == 0, explain(proc)
    return proc.stdout


@pytest.mark.parametrize("nodes, mesh", [
    (2, "mesh (dp=2, tp=8) over 16 ranks on 2 nodes x 8: tp groups within a node, dp groups across nodes"),
    (16, "mesh (dp=16, tp=8) over 128 ranks on 16 nodes x 8: tp groups within a node, dp groups across nodes"),
])
def test_slurm_tp8_dryrun_shows_script_rendezvous_and_mesh(tmp_path, model_dir, nodes, mesh):
    out = _dryrun(tmp_path, f"model.model_id={model_dir}", "executor=slurm", f"executor.nodes={nodes}",
                  "executor.gpus_per_node=8", "executor.partition=gpu",
                  "trainer.strategy=fsdp2_parallel(tensor_parallel_size=8)", "--name", "tp8")
    assert "FSDP2Strategy(" in out and "tensor_parallel_size=8" in out  # the graph
    for line in (f"#SBATCH --nodes={nodes}", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --partition=gpu"):
        assert line in out
    # one torchrun per node, 8 processes each, rendezvous on the head node
    assert "--rdzv-backend c10d --rdzv-endpoint $head_node_ip:29500" in out
    assert f"--nnodes {nodes} --nproc-per-node 8 --node-rank $SLURM_NODEID" in out
    assert mesh in out
    assert f"FSDP2 over {8 * nodes} GPUs (dp {nodes} x cp 1 x tp 8)" in out  # the memory plan of one GPU


def test_expert_parallel_dryrun_shows_the_experts_view_of_the_mesh(tmp_path):
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=8, num_local_experts=16,
                                     architectures=["MixtralForCausalLM"])
    cfg.save_pretrained(tmp_path / "mixtral")
    out = _dryrun(tmp_path, f"model.model_id={tmp_path / 'mixtral'}", "executor=slurm", "executor.nodes=2",
                  "executor.gpus_per_node=8", "trainer.strategy=fsdp2_parallel(expert_parallel_size=8)")
    assert "expert_parallel_size=8" in out  # the graph
    assert ("mesh (dp=16) over 16 ranks on 2 nodes x 8: dp groups across nodes; experts (efsdp=2, ep=8): "
            "ep groups within a node") in out
    assert "memory plan: not estimated (expert_parallel_size=8 is not modelled" in out  # said, not planned wrong


def test_a_mesh_that_does_not_fit_the_launch_is_named(tmp_path, model_dir):
    out = _dryrun(tmp_path, f"model.model_id={model_dir}", "executor=slurm", "executor.nodes=1",
                  "executor.gpus_per_node=6", "trainer.strategy=fsdp2_parallel(tensor_parallel_size=4)")
    assert "mesh: not possible (tensor_parallel_size=4 is invalid: must divide the number of processes (6))" in out
