"""`docker`: run a recipe in a container on the local Docker engine."""

# NeMo-Run's CLI parser reads these signatures and knows typing.Optional/Union, not `X | None`.
# ruff: noqa: UP007, UP045
import os
from typing import Optional

import nemo_run as run

from executors.elastic import restart_env, wants_torchrun
from nemo_automodel.errors import bad_value
from nemo_automodel.launch.job_env import job_env, python_roots, resolve_launcher

DEFAULT_IMAGE = os.environ.get("NEMO_AUTOMODEL_DOCKER_IMAGE", "nemo-automodel-ci:bookworm")


def docker(image: str = DEFAULT_IMAGE, ntasks_per_node: int = 1, launcher: Optional[str] = "auto",
           mounts: Optional[list[str]] = None, shm_size: Optional[str] = "2g", env_vars: Optional[dict[str, str]] = None,
           network: str = "nemo_run", num_gpus: Optional[int] = None, mount_host_python: bool = True,
           ulimits: Optional[list[str]] = None, max_restarts: int = 0) -> run.DockerExecutor:
    """A `run.DockerExecutor`.

    Args:
        image: a local or pullable image. The CI image (``.ci/docker-up.sh``) is a bare Debian
            rootfs: it relies on ``mount_host_python``.
        ntasks_per_node: processes in the container; ``launcher="auto"`` uses torchrun when > 1 (or
            ``max_restarts > 0``).
        mounts: extra ``"host:container[:ro|rw]"`` volumes. Outputs only reach the host through a
            mount: mount the recipe's ``log.log_dir`` (at the same path) to keep checkpoints.
        shm_size: ``/dev/shm`` size (data-loader workers and NCCL need more than Docker's 64 MB).
        env_vars: extra environment; ``PATH`` already starts with this venv's ``bin``.
        network: NeMo-Run's own bridge network ``"nemo_run"`` (created on first use; torchrun
            needs it: its rendezvous uses the container's hostname, unknown with ``"host"``), another
            network from ``docker network create``, or ``"host"`` for single-process jobs.
            ``"none"`` is refused by NeMo-Run (it tries to create it).
        num_gpus: GPUs to expose (``-1`` = all; needs the NVIDIA runtime).
        mount_host_python: bind-mount this venv, its base interpreter and editable sources
            read-only at the same paths, so the image needs no Python of its own.
        ulimits: e.g. ``["nofile=1024:1024"]`` (Podman needs lower limits).
        max_restarts: how often torchrun restarts the workers after one of them dies; they resume from the
            last checkpoint (`executors.elastic.restart_env`).

    The task directory is mounted at ``/nemo_run`` and the job starts in ``/nemo_run/code``.
    """
    launcher = resolve_launcher(ntasks_per_node, launcher, multi=ntasks_per_node > 1 or wants_torchrun(max_restarts))
    env = {**restart_env(max_restarts, launcher), **(env_vars or {})}
    if network == "none":
        raise bad_value("network", network, "NeMo-Run cannot use 'none': use 'host', 'bridge' or an --internal network")
    volumes = [f"{p}:{p}:ro" for p in python_roots()] if mount_host_python else []
    for m in mounts or []:
        if len(m.split(":")) not in (2, 3) or not m.split(":")[0]:
            raise bad_value("mounts", m, "use 'host_path:container_path[:ro|rw]'")
        volumes.append(m)
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return run.DockerExecutor(container_image=image, ntasks_per_node=ntasks_per_node, launcher=launcher,
                              volumes=volumes, shm_size=shm_size, env_vars=job_env(env, path=path),
                              network=network, num_gpus=num_gpus, ulimits=list(ulimits or []),
                              packager=run.Packager())
