"""DockerExecutor on the real local engine: a recipe file in the locally built image, 2 torchrun ranks."""

from __future__ import annotations

import json

import pytest

from tests.executors.cli_helpers import explain, run_cli, tiny_args

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.mark.distributed
def test_recipe_file_in_docker_with_two_torchrun_ranks(docker_engine, tiny_llama, chat_file, tmp_path, nemorun_home):
    out = tmp_path / "runs"  # mounted read-write by the CLI (log.log_dir); the inputs are mounted read-only
    mounts = f"executor.mounts=['{tiny_llama}:{tiny_llama}:ro','{chat_file.parent}:{chat_file.parent}:ro']"
    proc = run_cli(*tiny_args(tiny_llama, chat_file, out, "docker-ddp"), "executor=docker", mounts,
                   "executor.ntasks_per_node=2", "trainer.strategy=ddp", "--name", "docker-ddp", "--yes")
    assert proc.returncode == 0, explain(proc)
    last = out / "docker-ddp" / "checkpoints" / "last"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == 3 and meta["peft"] is True
    assert (last / "hf_adapter" / "adapter_model.safetensors").is_file()
    assert (last / "trainer-rank0.pt").is_file() and (last / "trainer-rank1.pt").is_file()
    logs = list((nemorun_home / "experiments" / "docker-ddp").glob("*/docker-ddp/log_*.out"))
    assert logs and "[default1]:" in logs[0].read_text()
