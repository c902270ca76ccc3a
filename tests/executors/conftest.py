"""Engines for executor tests: the local Slurm cluster and dockerd (started by .ci/*-up.sh), and CLI helpers.

The session fixtures start a daemon that is installed but not running (the scripts are idempotent
and take seconds when the engine is up); when the engine is not installed they skip with the
command that installs it, or fail under .ci/run (NEMO_AUTOMODEL_STRICT=1).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import unavailable

ROOT = Path(__file__).resolve().parents[2]
CI_DIR = Path(os.environ.get("NEMO_AUTOMODEL_CI_DIR", "/var/tmp/nemo-automodel-ci"))
SLURM_CONF = Path(os.environ.get("NEMO_AUTOMODEL_SLURM_DIR", CI_DIR / "slurm")) / "slurm.conf"
DOCKER_HOST = "unix://" + str(Path(os.environ.get("NEMO_AUTOMODEL_DOCKER_DIR", CI_DIR / "docker")) / "docker.sock")


def _engine_up(script: str, binaries: tuple[str, ...], env: dict[str, str]) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not installed: run .ci/{script} (apt-get installs it; needs root)")
    proc = subprocess.run([str(ROOT / ".ci" / script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})
    if proc.returncode != 0:
        unavailable(f".ci/{script} could not start the engine: {proc.stderr.strip()[-500:]}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Path:
    """A single-node Slurm cluster with accounting on localhost; sets SLURM_CONF for clients."""
    _engine_up("slurm-up.sh", ("slurmctld", "slurmd", "sbatch", "slurmdbd", "mariadbd"), {})
    os.environ["SLURM_CONF"] = str(SLURM_CONF)
    return SLURM_CONF


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """A private dockerd with the local CI image; sets DOCKER_HOST for clients."""
    _engine_up("docker-up.sh", ("dockerd", "debootstrap"), {})
    os.environ["DOCKER_HOST"] = DOCKER_HOST
    return DOCKER_HOST


@pytest.fixture(autouse=True)
def _no_stdin(monkeypatch):
    """NeMo-Run's tunnels run commands through `invoke`, which reads stdin; pytest forbids that."""
    monkeypatch.setattr(sys, "stdin", io.StringIO())


@pytest.fixture
def nemorun_home(tmp_path, monkeypatch) -> Path:
    """A private NEMORUN_HOME (experiments, job dirs, logs) for this test and its subprocesses."""
    from nemo_run.config import get_nemorun_home, set_nemorun_home

    home = tmp_path / "nemorun"
    previous = get_nemorun_home()
    set_nemorun_home(str(home))
    monkeypatch.setenv("NEMORUN_HOME", str(home))
    yield home
    set_nemorun_home(previous)


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Repeat {i}"}, {"role": "assistant", "content": f"{i} {i}"}]}
            for i in range(16)]
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def local_ddp_adapter(tiny_llama, chat_file, tmp_path_factory) -> dict:
    """The adapter of the tiny LoRA recipe run locally (NeMo-Run LocalExecutor, torchrun x2, DDP): what a
    Slurm or Docker job of the same recipe must produce bitwise (torchrun sets OMP_NUM_THREADS=1 in all)."""
    from tests.executors.cli_helpers import adapter, explain, run_cli, tiny_args

    out, home = tmp_path_factory.mktemp("local-ref"), tmp_path_factory.mktemp("nemorun-local-ref")
    proc = run_cli(*tiny_args(tiny_llama, chat_file, out, "local-ref"), "executor=local",
                   "executor.ntasks_per_node=2", "trainer.strategy=ddp", "--name", "local-ref", "--yes",
                   env={"NEMORUN_HOME": str(home)})
    assert proc.returncode == 0, explain(proc)
    return adapter(out / "local-ref")
