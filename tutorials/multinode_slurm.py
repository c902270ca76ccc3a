# %% [markdown]
# # Multi-node fine-tuning on Slurm
#
# A recipe is a lazily built graph (`run.Partial(finetune, ...)`); where it runs is a separate
# choice, an *executor*. This tutorial sends the same LoRA fine-tune to a Slurm cluster with
# `executors.slurm(...)`, checks the generated sbatch script before submitting, waits for the
# job, and reads its logs, metrics and checkpoint.
#
# What a multi-node job looks like: one sbatch job over `nodes` nodes; on each node `srun`
# starts one `torchrun`, which starts `ntasks_per_node` processes (one per GPU) and joins the
# others through a rendezvous on the first node. torchrun sets `RANK`, `WORLD_SIZE` and
# `LOCAL_RANK`; the trainer's `ddp`/`fsdp2` strategy builds its process group from them.
#
# The test suite runs this file on a one-node cluster on localhost (`.ci/slurm-up.sh` starts
# it; `export SLURM_CONF=/var/tmp/nemo-automodel-ci/slurm/slurm.conf`) with 2 CPU ranks:
#
#     .venv/bin/python tutorials/multinode_slurm.py --model <HF folder> --max-steps 3
#
# On a real cluster pass `--nodes 2 --gpus-per-node 8 --partition <p> --account <a>`.

# %%
import argparse
import json
import os
import subprocess
from pathlib import Path

import nemo_run as run

import executors
from nemo_automodel.demo import assets
from nemo_automodel.launch.experiment import Experiment, JobFailed
from recipes import hf_auto_model_for_causal_lm as base

# %% [markdown]
# ## Settings
#
# Command-line flags as a script; in a notebook, edit the defaults here.

# %%
parser = argparse.ArgumentParser(description="Multi-node LoRA fine-tune on Slurm")
parser.add_argument("--model", default=None, help="HF model folder or id (default: embedded SmolLM2-135M-Instruct)")
parser.add_argument("--nodes", type=int, default=1, help="nodes to allocate")
parser.add_argument("--ntasks-per-node", type=int, default=2, help="processes per node (CPU ranks here)")
parser.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (sets ntasks-per-node)")
parser.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
parser.add_argument("--account", default="root", help="Slurm account")
parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp2"], help="data-parallel strategy")
parser.add_argument("--max-steps", type=int, default=10, help="optimizer steps")
parser.add_argument("--samples", type=int, default=64, help="chat samples to train on")
parser.add_argument("--out", default="tutorial_runs", help="output directory (must be on a shared filesystem)")
parser.add_argument("--dryrun", action="store_true", help="only print the sbatch script")
args, _ = parser.parse_known_args()  # "known": a Jupyter kernel adds flags of its own

OUT = Path(args.out).absolute()  # the job writes here: relative paths would land in its job folder
ranks_per_node = args.gpus_per_node or args.ntasks_per_node

# %% [markdown]
# ## 1. The recipe: tell the trainer how many nodes and ranks
#
# `trainer.num_nodes` and `trainer.devices` describe the job to the trainer; the processes
# themselves come from the executor below. The data module splits every global batch of 8
# over all ranks (`world = nodes × ranks per node`).

# %%
recipe = base.finetune_recipe(model_id=args.model or run.Config(assets.smollm2_hf_dir), dir=str(OUT),
                              name="multinode", max_steps=args.max_steps, num_nodes=args.nodes,
                              num_gpus_per_node=ranks_per_node, strategy=args.strategy, seq_length=64,
                              micro_batch_size=2, global_batch_size=2 * args.nodes * ranks_per_node, lr=1e-3)
recipe.data = base.data(run.Config(assets.demo_chat_dataset, limit=args.samples), "chat", 64, 2,
                        2 * args.nodes * ranks_per_node)
recipe.resume = None  # start fresh each time (keep AutoResume to continue a preempted job)
print(f"{args.nodes} node(s) x {ranks_per_node} rank(s), strategy={args.strategy}, output {OUT / 'multinode'}")

# %% [markdown]
# ## 2. The executor: what to set
#
# | knob | meaning |
# |---|---|
# | `account`, `partition`, `qos` | as in `sbatch`; ask your admins |
# | `nodes`, `gpus_per_node` | the allocation; `ntasks_per_node` follows `gpus_per_node` |
# | `time` | wall-clock limit; a job past it ends TIMEOUT (reported as failed) |
# | `tunnel` | `"local"` on a login node, or `"ssh"` with `host`, `user`, `remote_job_dir`, `identity` |
# | `python_bin` | the cluster's venv `bin` with this package (default: this venv, for a shared filesystem) |
# | `packager` | `"none"` (code already on the cluster) or `"git"` (ships `git archive HEAD`) |
# | `container_image` | needs the pyxis plugin; then `python_bin` points inside the image |
#
# From a laptop, for example:
#
#     executors.slurm(account="llm", partition="gpu", nodes=2, gpus_per_node=8, time="04:00:00",
#                     tunnel="ssh", host="login.cluster", user="me", remote_job_dir="/lustre/me/jobs",
#                     identity="~/.ssh/id_ed25519", python_bin="/lustre/me/venv/bin")
#
# Here the cluster is this machine: the `local` tunnel, the job files under `$NEMORUN_HOME`.

# %%
executor = executors.slurm(account=args.account, partition=args.partition, nodes=args.nodes,
                           ntasks_per_node=args.ntasks_per_node, gpus_per_node=args.gpus_per_node,
                           time="00:20:00", env_vars={"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
print(f"launcher={executor.launcher}, nodes={executor.nodes}, tasks per node={executor.ntasks_per_node}")

# %% [markdown]
# ## 3. Check the sbatch script before submitting
#
# `Experiment.dryrun()` prints exactly what would be submitted: the `#SBATCH` lines, the
# environment (the venv's `bin` first on `PATH`, or the job fails with `No module named
# nemo_run`), and the `srun … torchrun --nnodes N --nproc-per-node M` line. The same from the
# shell: `python recipes/smollm2_135m.py executor=slurm executor.nodes=2 --dryrun`.

# %%
exp = Experiment("multinode-tutorial", executor=executor)
exp.add(recipe, name="multinode")
script = exp.dryrun()["multinode"]
assert f"#SBATCH --nodes={args.nodes}" in script
if args.dryrun:
    raise SystemExit(0)

# %% [markdown]
# ## 4. Submit and wait
#
# `exp.run()` submits with `sbatch`, polls `sacct`, and waits. Plain NeMo-Run only shows a
# failed job in its status table (and exits 0); here a failure raises `JobFailed`, whose message
# ends with the last lines of the job's log. `exp.run(detach=True)` returns after submitting.

# %%
try:
    states = exp.run()
except JobFailed as failure:
    print(failure)
    raise
print(states)

# %% [markdown]
# ## 5. Read the logs
#
# Everything about the job is in its folder, `exp.job_dir("multinode")`:
# - `log-<job name>_<slurm id>_<restart>.out` (one node) or `..._<restart>_node<i>.out` (one per node of a
#   multi-node job; `exp.logs(...)` shows them all): the training output; torchrun prefixes each
#   line with its rank (`[default0]:`, `[default1]:`), so all ranks of a node are in one file;
# - `sbatch_<job name>_<slurm id>.out`: the batch script's own output (setup, `srun` errors);
# - `configs/`: the serialized graph and executor that ran.
#
# `exp.logs(name)` returns the last lines; `sacct -j <id>` shows the accounting record.

# %%
job_dir = exp.job_dir("multinode")
print(sorted(p.name for p in job_dir.iterdir()))
print(exp.logs("multinode", lines=8))
slurm_id = exp.status_details()["multinode"]["job_id"]
print(subprocess.run(["sacct", "-j", slurm_id, "-X", "-o", "JobID,JobName%30,State,Elapsed,NNodes"],
                     capture_output=True, text=True, env=os.environ).stdout)

# %% [markdown]
# The run folder holds what training wrote: `metrics.jsonl` (rank 0 logs for everyone),
# `loss.png`, `tensorboard/`, and `checkpoints/last/` with the LoRA adapter in PEFT format and
# one trainer state file per rank.

# %%
run_dir = exp.run_dirs()["multinode"]
rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
print("train loss:", " ".join(f"{r['train_loss']:.3f}" for r in rows if "train_loss" in r))
last = (run_dir / "checkpoints" / "last").resolve()
print(f"{last.name}: {sorted(p.name for p in last.iterdir())}")
print(exp.summary())

# %% [markdown]
# ## 6. Later, from another shell: status, logs, cancel
#
# The experiment is saved under `$NEMORUN_HOME/experiments/`; its id brings it back in any
# process. `cancel()` runs `scancel` on every task still running.

# %%
again = Experiment.from_id(exp.id)
print(exp.id, again.status())
# again.cancel()            # scancel the whole experiment
# again.cancel("multinode") # or one task

# %% [markdown]
# ## Troubleshooting
#
# - `No module named 'nemo_run'` in the log: the job's `python` is not this venv's; set
#   `python_bin` (or `setup_lines="source /path/venv/bin/activate"`).
# - `PersistentSacctFailure` although the job ran: NeMo-Run polls `sacct`, which needs Slurm
#   accounting (slurmdbd). Ask your admins, or see `.ci/slurm-up.sh` for a local set-up.
# - `sbatch: Unable to open file`: with the local tunnel the job files must be where the
#   experiment writes them (`executors.slurm` sets this); with SSH, `remote_job_dir` must exist.
# - `Invalid generic resource (gres) specification`: `gpus_per_node` on nodes that declare no GPUs.
# - The job stays PENDING: more nodes, memory or time than the partition allows (`sinfo`, `squeue`).
# - `unrecognized option '--container-image'`: the cluster has no pyxis plugin.
# - Nothing is written where you expected: relative output paths resolve in the job's folder;
#   use absolute paths on a shared filesystem.
