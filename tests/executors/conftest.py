"""Engines for executor tests: the local Slurm cluster and dockerd (started by .ci/*-up.sh), and CLI helpers.

The session fixtures start a daemon that is installed but not running (the scripts are idempotent
and take seconds when the engine is up); when the engine is not installed, or (Slurm) not up and this user is
not root, they skip with one line saying so and what to run, or fail under .ci/run (NEMO_AUTOMODEL_STRICT=1).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.helpers import unavailable
from tests.parallel import shared_build

ROOT = Path(__file__).resolve().parents[2]
CI_DIR = Path(os.environ.get("NEMO_AUTOMODEL_CI_DIR", "/var/tmp/nemo-automodel-ci"))
SLURM_CONF = Path(os.environ.get("NEMO_AUTOMODEL_SLURM_DIR", CI_DIR / "slurm")) / "slurm.conf"
CANNOT = 77  # a .ci/*-up.sh exit status: this user cannot start the engine (its last line says why)
DOCKER_HOST = "unix://" + str(Path(os.environ.get("NEMO_AUTOMODEL_DOCKER_DIR", CI_DIR / "docker")) / "docker.sock")


def engine_unavailable(script: str, proc: subprocess.CompletedProcess) -> str | None:
    """Why the engine is not there after ``.ci/<script>`` ran (None: it is up). A script exits `CANNOT` with one
    line saying why this user cannot start it (.ci/slurm-up.sh without root); any other failure gives its tail."""
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
    if proc.returncode == CANNOT:
        return lines[-1].partition("] ")[2] or lines[-1]  # without the script's "[slurm-up] " prefix
    return f".ci/{script} could not start the engine: {' | '.join(lines)[-500:]}"


def _engine_up(script: str, binaries: tuple[str, ...], env: dict[str, str]) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing and os.geteuid() == 0:
        unavailable(f"{', '.join(missing)} not installed: run `make engines` (.ci/{script} installs them)")
    if missing and script != "slurm-up.sh":  # the Slurm script itself says what a user other than root can do
        unavailable(f"{', '.join(missing)} not installed: run `make engines` (.ci/{script}) as root")
    proc = subprocess.run([str(ROOT / ".ci" / script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})
    reason = engine_unavailable(script, proc)
    if reason:
        unavailable(reason)


@pytest.fixture(scope="session")
def slurm_cluster() -> Path:
    """The local Slurm cluster with accounting (nodes n1, n2 on this machine); sets SLURM_CONF for clients."""
    _engine_up("slurm-up.sh", ("slurmctld", "slurmd", "sbatch", "slurmdbd", "mariadbd"), {})
    os.environ["SLURM_CONF"] = str(SLURM_CONF)
    return SLURM_CONF


@pytest.fixture(scope="session")
def slurm_two_nodes(slurm_cluster) -> list[str]:
    """The cluster's two nodes (n1, n2: two slurmd daemons on this machine, NodeAddr 127.0.0.1), both up."""
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True)
    up = [line.split()[0] for line in proc.stdout.splitlines() if line.split()[1] in ("idle", "mixed", "allocated")]
    if len(up) < 2:
        unavailable(f"the local Slurm cluster has {len(up)} node(s) up, not 2: run .ci/slurm-up.sh ({proc.stdout!r})")
    return up


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


class LocalRun(NamedTuple):
    run_dir: Path  # log.log_dir / log.name
    stdout: str  # the recipe file's output (it ends with the job's final status)
    home: Path  # its NEMORUN_HOME (experiments, torchrun's combined.log)


@pytest.fixture(scope="session")
def local_ddp_run(tiny_llama, chat_file, tmp_path_factory) -> LocalRun:
    """The tiny LoRA recipe file run locally (NeMo-Run LocalExecutor, torchrun x2, DDP), once per `make test`
    (shared by the xdist workers): test_executors_local checks it, and a Slurm or Docker job of the same recipe
    must produce its adapter bitwise (torchrun sets OMP_NUM_THREADS=1 in all)."""
    from tests.executors.cli_helpers import explain, run_cli, tiny_args

    def build(root: Path) -> None:
        proc = run_cli(*tiny_args(tiny_llama, chat_file, root / "runs", "local-ref"), "executor=local",
                       "executor.ntasks_per_node=2", "trainer.strategy=ddp", "--name", "local-ref", "--yes",
                       env={"NEMORUN_HOME": str(root / "nemorun")})
        assert proc.returncode == 0, explain(proc)
        (root / "stdout.txt").write_text(proc.stdout)

    root = shared_build(tmp_path_factory, "executors-local-ddp-run", build)
    return LocalRun(root / "runs" / "local-ref", (root / "stdout.txt").read_text(), root / "nemorun")


@pytest.fixture(scope="session")
def local_ddp_adapter(local_ddp_run) -> dict:
    """The adapter of ``local_ddp_run``: the reference of the Slurm and Docker runs."""
    from tests.executors.cli_helpers import adapter

    return adapter(local_ddp_run.run_dir)
