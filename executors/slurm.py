"""`slurm`: submit a recipe with sbatch, from a login node (LocalTunnel) or over SSH (SSHTunnel)."""

# NeMo-Run's CLI parser reads these signatures and knows typing.Optional/Union, not `X | None`.
# ruff: noqa: UP007, UP045
import os
import re
import shlex
from pathlib import Path
from typing import Any, Optional, Union

import nemo_run as run
from nemo_run.config import get_nemorun_home
from nemo_run.core.execution.slurm import SlurmJobDetails

from executors.elastic import restart_env, wants_torchrun
from nemo_automodel.errors import bad_value, check_int
from nemo_automodel.launch.job_env import job_env, resolve_launcher, venv_bin

_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")
_PLAIN = re.compile(r"^[A-Za-z0-9_.,+-]+$")  # sbatch values that also land in shell lines (log paths)
#: Shell lines run after NeMo-Run's sbatch header set ``head_node_ip`` (``hostname --ip-address`` on the first
#: node): a multi-node torchrun rendezvous takes the head node's Slurm NodeAddr instead, the address slurmctld
#: itself reaches that node at. ``hostname --ip-address`` can name a loopback address (Debian maps the host name
#: to 127.0.1.1) or several, and node names need not resolve; the NodeAddr is reachable by construction.
HEAD_NODE_ADDR = ("head_node_addr=$(scontrol show node -o \"$head_node\" | sed -n 's/.* NodeAddr=\\([^ ]*\\).*/\\1/p')\n"
                  'if [ -n "$head_node_addr" ]; then head_node_ip=$head_node_addr; fi')


def requeue_on_failure(max_requeues: int) -> str:
    """A batch-script line: on a non-zero exit, ``scontrol requeue`` this job unless it already ran
    ``max_requeues`` times again (``SLURM_RESTART_COUNT``); Slurm itself requeues only on node failure."""
    return (f"trap 'rc=$?; if [ \"$rc\" -ne 0 ] && [ \"${{SLURM_RESTART_COUNT:-0}}\" -lt {max_requeues} ]; then "
            f"echo \"job $SLURM_JOB_ID ended with exit $rc: requeued (restart $((${{SLURM_RESTART_COUNT:-0}} + 1)) "
            f"of at most {max_requeues})\"; scontrol requeue \"$SLURM_JOB_ID\"; fi' EXIT")


class PerNodeLogs(SlurmJobDetails):
    """Job files where NeMo-Run puts them, but each node's tasks log to a file of their own:
    ``log-<job>_<id>_<attempt>_node<i>.out``, ``i`` the node's index in the allocation (srun's ``%n``; 0 is the
    head node). ``Experiment.logs`` shows the newest attempt's file of every node."""

    @property
    def srun_stdout(self) -> Path:
        return super().srun_stdout.with_name(super().srun_stdout.name.replace(".out", "_node%n.out"))

    @property
    def srun_stderr(self) -> Path:
        return super().srun_stderr.with_name(super().srun_stderr.name.replace(".err", "_node%n.err"))


def slurm(account: str = "root", partition: Optional[str] = None, nodes: int = 1, ntasks_per_node: Optional[int] = None,
          gpus_per_node: Optional[int] = None, time: str = "00:30:00", mem: Optional[str] = None,
          launcher: Optional[str] = "auto", container_image: Optional[str] = None, container_mounts: Optional[list[str]] = None,
          tunnel: str = "local", host: Optional[str] = None, user: Optional[str] = None, remote_job_dir: Optional[str] = None,
          identity: Optional[str] = None, packager: Union[str, run.Packager] = "none", python_bin: Optional[str] = None,
          env_vars: Optional[dict[str, str]] = None, setup_lines: Optional[str] = None, qos: Optional[str] = None,
          exclusive: Optional[bool] = None, job_name_prefix: Optional[str] = None,
          additional_parameters: Optional[dict[str, Any]] = None, requeue: bool = False,
          max_requeues: int = 3, max_restarts: int = 0) -> run.SlurmExecutor:
    """A `run.SlurmExecutor`.

    Args:
        account, partition, qos: passed to ``sbatch`` as is.
        nodes: nodes to allocate. ``ntasks_per_node`` defaults to ``gpus_per_node`` (or 1).
        gpus_per_node: ``--gpus-per-node``; the cluster must declare GPUs (``Gres=gpu:N``).
        time: wall-clock limit ``[D-]HH:MM:SS``; a job past it ends TIMEOUT (reported as failed).
        mem: memory per node (``"64G"``); more than the node has is refused at submit time.
        launcher: ``"torchrun"``, ``None`` (srun starts ``ntasks_per_node`` copies that all think
            they are rank 0), or ``"auto"``: torchrun when there is more than one process (or
            ``max_restarts > 0``). With torchrun NeMo-Run asks Slurm for one task per node and starts
            ``--nproc-per-node``. A multi-node job's nodes log to one file each (`PerNodeLogs`).
        container_image, container_mounts: need the pyxis/enroot plugin on the cluster.
        tunnel: ``"local"`` (this machine can run sbatch; job files stay in
            ``$NEMORUN_HOME/experiments``) or ``"ssh"`` (``host``, ``user``, ``remote_job_dir``
            and ``identity``, a private-key file).
        packager: ``"none"`` (the cluster already has this code, e.g. a shared filesystem or a
            container), ``"git"`` (``git archive HEAD``: committed code only, unpacked in
            ``<task>/code``) or any `run.Packager`.
        python_bin: the ``bin`` folder, on the cluster, of a Python with nemo_run and this package;
            it leads ``PATH``. Defaults to this venv's (right for a shared filesystem).
        env_vars: extra environment variables; ``setup_lines``: shell lines run before the job
            (``module load …``, ``source …/activate``). A multi-node torchrun job's rendezvous runs on the
            first node of the allocation, at its Slurm ``NodeAddr`` (`HEAD_NODE_ADDR`).
        exclusive, job_name_prefix, additional_parameters: more ``sbatch`` options.
        requeue: ``sbatch --requeue`` (Slurm requeues the job when a node fails or it is preempted), and a job
            that ends non-zero (a rank killed, a node lost, a preemption checkpointed) is requeued by
            its own batch script, at most ``max_requeues`` times; the run resumes from its last verified
            checkpoint (``AutoResume``). Each attempt's tasks log to ``log-…_<attempt>[_node<i>].out``. Slurm
            starts a requeued job only after the credential lifetime (``AuthInfo=cred_expire``, 120 s by
            default). Preemption: send
            ``scancel --signal=TERM <job>`` (every step's processes, both nodes, not the batch script, which then
            requeues): the ranks checkpoint and exit 75 (torchrun, signalled too, exits 1).
        max_restarts: elastic restarts inside the allocation: after a worker dies, torchrun restarts the workers
            of every node up to this many times, without a requeue; they resume from the last checkpoint
            (`executors.elastic.restart_env`). A lost node still ends the job (then ``requeue`` applies).
    """
    for field, value in (("nodes", nodes), ("ntasks_per_node", ntasks_per_node), ("gpus_per_node", gpus_per_node)):
        check_int(field, value, allow_none=True)
    for field, option in (("account", account), ("partition", partition), ("qos", qos), ("mem", mem),
                          ("job_name_prefix", job_name_prefix)):
        if option is not None and not _PLAIN.match(str(option)):
            raise bad_value(field, option, "use letters, digits and . _ , + - only")
    for key, value in (additional_parameters or {}).items():
        if "\n" in f"{key}{value}":
            raise bad_value(f"additional_parameters[{key!r}]", value, "no newlines")
    check_int("max_requeues", max_requeues, minimum=0)
    if not _TIME.match(time):
        raise bad_value("time", time, "use [D-]HH:MM:SS, e.g. '00:30:00' or '1-00:00:00'")
    ntasks = ntasks_per_node or gpus_per_node or 1
    launcher = resolve_launcher(ntasks, launcher, multi=ntasks > 1 or nodes > 1 or wants_torchrun(max_restarts))
    if tunnel == "local":
        if host or remote_job_dir:
            raise bad_value("tunnel", tunnel, "host/remote_job_dir need tunnel='ssh'")
        # sbatch must find the job files where the experiment writes them
        tun = run.LocalTunnel(job_dir=os.path.join(get_nemorun_home(), "experiments"))
    elif tunnel == "ssh":
        if not (host and remote_job_dir):
            raise bad_value("tunnel", tunnel, "'ssh' needs host=… and remote_job_dir=… (and user, identity)")
        tun = run.SSHTunnel(host=host, user=user or os.environ.get("USER", ""), job_dir=remote_job_dir,
                            identity=identity)
    else:
        raise bad_value("tunnel", tunnel, "use 'local' or 'ssh'")
    if packager == "none":
        pkg: run.Packager = run.Packager()
    elif packager == "git":
        pkg = run.GitArchivePackager()
    elif isinstance(packager, run.Packager):
        pkg = packager
    else:
        raise bad_value("packager", packager, "use 'none', 'git' or a run.Packager")
    # NeMo-Run writes `export KEY=value` lines into the sbatch script unquoted: quote every value.
    env = {k: shlex.quote(v) for k, v in job_env({**restart_env(max_restarts, launcher), **(env_vars or {})}).items()}
    if python_bin or tunnel == "ssh":
        env["PATH"] = shlex.quote(python_bin or venv_bin()) + ':"$PATH"'  # $PATH of the cluster node
    if launcher == "torchrun" and nodes > 1:
        setup_lines = HEAD_NODE_ADDR + (f"\n{setup_lines}" if setup_lines else "")
    if requeue:
        setup_lines = requeue_on_failure(max_requeues) + (f"\n{setup_lines}" if setup_lines else "")
        additional_parameters = {"requeue": True, **(additional_parameters or {})}
    return run.SlurmExecutor(account=account, partition=partition, nodes=nodes, ntasks_per_node=ntasks,
                             gpus_per_node=gpus_per_node, time=time, mem=mem, launcher=launcher,
                             container_image=container_image, container_mounts=list(container_mounts or []),
                             tunnel=tun, packager=pkg, env_vars=env, setup_lines=setup_lines, qos=qos,
                             exclusive=exclusive, job_name_prefix=job_name_prefix,
                             additional_parameters=additional_parameters,
                             job_details=PerNodeLogs() if nodes > 1 else SlurmJobDetails())
