"""``python -m nemo_automodel.plan <recipe | model id | model folder> --gpus 8 --gpu-memory 80GiB --seq 4096 [key=value …]``

The same command as ``nemo automodel plan`` (see ``nemo_automodel.launch.plan_cli``).
"""

from nemo_automodel.launch.plan_cli import main
from recipes.cli import plan_target

if __name__ == "__main__":
    raise SystemExit(main(None, resolve=plan_target))
