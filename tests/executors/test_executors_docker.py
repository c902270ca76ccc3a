"""DockerExecutor on the real local engine: a recipe file in the locally built image, 2 torchrun ranks."""

from __future__ import annotations

import json

import nemo_run as run
import pytest

import executors
from nemo_automodel.launch.experiment import Experiment
from tests.executors import jobs
from tests.executors.cli_helpers import ROOT, adapter, assert_bitwise_equal, explain, run_cli, tiny_args

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.mark.distributed
def test_recipe_file_in_docker_with_two_torchrun_ranks(docker_engine, tiny_llama, chat_file, tmp_path, nemorun_home,
                                                       local_ddp_adapter):
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
    assert_bitwise_equal(adapter(out / "docker-ddp"), local_ddp_adapter)  # the same training as a local run


def test_docker_job_passes_metacharacters_in_arguments_and_env_literally(docker_engine, tmp_path, nemorun_home):
    """Executed for real (not --dryrun): nothing in an argument or an env value reaches a shell."""
    marker = tmp_path / "pwned"  # inside the mounted folder: a command run in the container would be seen here
    weird = f"$(touch {marker}); `touch {marker}` 'q' \"dq\" a b; touch {marker}"
    target = tmp_path / "env $(id) `id` ;&|.json"
    exp = Experiment("docker-quoting", executor=executors.docker(
        env_vars={"PYTHONPATH": str(ROOT), "WEIRD": weird}, mounts=[f"{tmp_path}:{tmp_path}"], network="host"))
    exp.add(run.Partial(jobs.write_env, str(target), ["WEIRD"]), name="quoting")
    assert exp.run() == {"quoting": "SUCCEEDED"}
    assert json.loads(target.read_text()) == {"WEIRD": weird}
    assert not marker.exists(), "a shell metacharacter was executed"
