"""Executor factories: their knobs, their validation, and their registration for NeMo-Run's CLI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import fiddle as fdl
import nemo_run as run
import pytest
from nemo_run.cli.api import RunContext
from nemo_run.cli.cli_parser import parse_cli_args, parse_factory

import executors
from nemo_automodel.errors import ConfigError

VENV_BIN = str(Path(sys.executable).parent)


def test_local_defaults_to_torchrun_for_several_tasks_and_leads_path_with_the_venv():
    one, two = executors.local(), executors.local(ntasks_per_node=2, env_vars={"FOO": "a b"})
    assert one.launcher is None and two.launcher == "torchrun" and two.ntasks_per_node == 2
    assert two.env_vars["PATH"].split(":")[0] == VENV_BIN and two.env_vars["FOO"] == "a b"
    assert two.env_vars["PYTHONUNBUFFERED"] == "1"
    assert executors.local(ntasks_per_node=2, launcher=None).launcher is None


def test_docker_mounts_the_host_python_read_only_and_keeps_user_mounts():
    ex = executors.docker(image="img:1", mounts=["/data:/data:ro"], shm_size="4g", env_vars={"A": "1"})
    assert isinstance(ex, run.DockerExecutor) and ex.container_image == "img:1" and ex.shm_size == "4g"
    mounted = {v.split(":")[0]: v for v in ex.volumes}
    assert mounted[sys.base_prefix].endswith(":ro") and "/data" in mounted
    assert any(sys.prefix.startswith(p) for p in mounted)  # the venv (or the repo holding it)
    assert ex.env_vars["PATH"].startswith(VENV_BIN + ":") and ex.env_vars["A"] == "1"
    assert ex.network == "nemo_run" and type(ex.packager) is run.Packager
    assert executors.docker(mount_host_python=False).volumes == []


def test_slurm_knobs_tunnels_and_packagers(tmp_path):
    ex = executors.slurm(account="acct", partition="gpu", nodes=2, gpus_per_node=8, time="04:00:00",
                         env_vars={"X": "$(touch /tmp/never)"})
    assert (ex.account, ex.partition, ex.nodes, ex.gpus_per_node, ex.time) == ("acct", "gpu", 2, 8, "04:00:00")
    assert ex.ntasks_per_node == 8 and ex.launcher == "torchrun"  # one process per GPU
    assert isinstance(ex.tunnel, run.LocalTunnel)
    assert ex.tunnel.job_dir == os.path.join(run.config.get_nemorun_home(), "experiments")
    assert ex.env_vars["X"] == "'$(touch /tmp/never)'"  # quoted: NeMo-Run writes unquoted `export` lines
    assert type(ex.packager) is run.Packager and executors.slurm().launcher is None
    assert isinstance(executors.slurm(packager="git").packager, run.GitArchivePackager)
    ssh = executors.slurm(tunnel="ssh", host="login.example", user="me", remote_job_dir="/scratch/me/jobs",
                          identity=str(tmp_path / "key"), python_bin="/shared/venv/bin")
    assert isinstance(ssh.tunnel, run.SSHTunnel) and ssh.tunnel.host == "login.example"
    assert ssh.tunnel.job_dir == "/scratch/me/jobs" and ssh.env_vars["PATH"] == '/shared/venv/bin:"$PATH"'


@pytest.mark.parametrize("factory,kwargs,field", [
    (executors.local, {"ntasks_per_node": 0}, "ntasks_per_node"),
    (executors.local, {"launcher": "mpirun"}, "launcher"),
    (executors.local, {"env_vars": {"BAD-NAME": "1"}}, "env_vars key"),
    (executors.docker, {"network": "none"}, "network"),
    (executors.docker, {"mounts": ["nocolon"]}, "mounts"),
    (executors.slurm, {"nodes": 0}, "nodes"),
    (executors.slurm, {"time": "forever"}, "time"),
    (executors.slurm, {"tunnel": "ftp"}, "tunnel"),
    (executors.slurm, {"tunnel": "ssh"}, "tunnel"),
    (executors.slurm, {"packager": "zip"}, "packager"),
    (executors.slurm, {"account": "a;rm -rf ~"}, "account"),
    (executors.slurm, {"partition": "p$(id)"}, "partition"),
    (executors.slurm, {"additional_parameters": {"comment": "x\necho pwned"}}, "additional_parameters"),
])
def test_bad_executor_values_name_the_field(factory, kwargs, field):
    with pytest.raises(ConfigError, match=rf"^{field}"):
        factory(**kwargs)


@pytest.mark.parametrize("name,cls", [("local", run.LocalExecutor), ("docker", run.DockerExecutor),
                                      ("slurm", run.SlurmExecutor)])
def test_factories_are_registered_for_the_cli_with_their_knobs(name, cls):
    cfg = parse_factory(RunContext, "executor", run.Executor, name)
    assert isinstance(cfg, run.Config) and cfg.__fn_or_cls__ is executors.REGISTRY[name]
    cfg = parse_cli_args(cfg, ["ntasks_per_node=2"])
    ex = fdl.build(cfg)
    assert isinstance(ex, cls) and ex.ntasks_per_node == 2
    called = fdl.build(parse_factory(RunContext, "executor", run.Executor, f"{name}(ntasks_per_node=3)"))
    assert called.ntasks_per_node == 3


def test_slurm_nodes_override_from_the_cli():
    cfg = parse_cli_args(parse_factory(RunContext, "executor", run.Executor, "slurm"),
                         ["nodes=2", "gpus_per_node=4", "partition=batch"])
    ex = fdl.build(cfg)
    assert (ex.nodes, ex.ntasks_per_node, ex.partition, ex.launcher) == (2, 4, "batch", "torchrun")


def test_max_restarts_reaches_torchrun_through_its_environment():
    local = executors.local(ntasks_per_node=2, max_restarts=3)
    assert local.env_vars["PET_MAX_RESTARTS"] == "3" and local.env_vars["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert executors.local(max_restarts=1).launcher == "torchrun"  # 'auto': only torchrun restarts workers
    assert "PET_MAX_RESTARTS" not in executors.local(ntasks_per_node=2).env_vars
    slurm = executors.slurm(nodes=2, max_restarts=2)
    assert slurm.env_vars["PET_MAX_RESTARTS"] == "2" and slurm.launcher == "torchrun"
    assert executors.docker(ntasks_per_node=2, max_restarts=1).env_vars["PET_MAX_RESTARTS"] == "1"
    for factory in (executors.local, executors.slurm, executors.docker):
        with pytest.raises(ConfigError, match=r"^max_restarts=1 restarts torchrun's workers, but launcher=None"):
            factory(launcher=None, max_restarts=1)
        with pytest.raises(ConfigError, match=r"^max_restarts=-1 is invalid"):
            factory(max_restarts=-1)


def test_a_multi_node_slurm_job_logs_one_file_per_node(tmp_path):
    from executors.slurm import PerNodeLogs

    two, one = executors.slurm(nodes=2), executors.slurm()
    assert isinstance(two.job_details, PerNodeLogs) and not isinstance(one.job_details, PerNodeLogs)
    two.job_details.folder, two.job_details.job_name = str(tmp_path), "job"
    assert two.job_details.srun_stdout.name == "log-job_%j_${SLURM_RESTART_COUNT:-0}_node%n.out"  # srun's %n


def test_without_root_the_slurm_script_says_why_in_one_line(tmp_path):
    """.ci/slurm-up.sh run by another user than root, with no cluster up: exit 77 and one line, which the Slurm
    tests' fixture skips with (tests/executors/conftest.py)."""
    import subprocess

    from tests.executors.conftest import CANNOT, ROOT, engine_unavailable

    as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    proc = subprocess.run([*as_user, "bash", str(ROOT / ".ci" / "slurm-up.sh")], capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ["PATH"], "NEMO_AUTOMODEL_SLURM_DIR": str(tmp_path)})
    assert proc.returncode == CANNOT, proc.stderr
    reason = engine_unavailable("slurm-up.sh", proc)
    assert reason == (f"not root (uid {65534 if as_user else os.geteuid()}): the local Slurm cluster is not up in "
                      f"{tmp_path} and only root can install and start it: "
                      "run `make engines` (.ci/slurm-up.sh) as root")
