"""``python -m nemo_automodel.plan <recipe | model id | model folder> --gpus 8 --gpu-memory 80GiB --seq 4096 [key=value …]``

The same command as ``nemo automodel plan`` (see ``nemo_automodel.launch.plan_cli``).
"""

import recipes
from nemo_automodel.launch.plan_cli import main
from nemo_automodel.launch.recipe_cli import import_recipes, plan_target

if __name__ == "__main__":
    import_recipes(recipes)
    raise SystemExit(main(None, resolve=plan_target))
