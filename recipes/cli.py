"""Recipe files on the command line: NeMo-Run's override syntax, executors, sweeps, honest exit codes.

    python recipes/smollm2_135m.py trainer.max_steps=5 --yes                   # in this process
    python recipes/smollm2_135m.py peft=None optim.optimizer_fn.lr=5e-5 --dryrun  # print the graph
    python recipes/smollm2_135m.py executor=local executor.ntasks_per_node=2 trainer.strategy=ddp --yes
    python recipes/smollm2_135m.py executor=slurm executor.nodes=2 --dryrun    # + the sbatch script
    python recipes/smollm2_135m.py optim.optimizer_fn.lr=[1e-4,3e-4] peft.dim=[8,16] --yes  # 4 runs
    nemo automodel finetune --factory smollm2_135m trainer.max_steps=5 --yes    # same, via `nemo`
    nemo automodel plan smollm2_135m --gpus 8 --gpu-memory 80GiB --seq 4096     # will it fit? (nemo_automodel.plan)
    nemo automodel preflight smollm2_135m data.seq_length=512 --html data.html   # what will it train on?

The harness (sweeps, dry runs, exit codes) is `nemo_automodel.launch.recipe_cli`; this module hands it the
recipes and executors (the ``nemo`` command loads it through the ``nemo_run.cli`` entry point).
"""

import executors
import recipes
from nemo_automodel.launch.recipe_cli import main, plan_target, register

register(recipes, executors.REGISTRY)

__all__ = ["main", "plan_target"]
