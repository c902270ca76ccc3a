"""Real images offline: a tiny vision-language model learns scikit-learn's handwritten digits.

Both the model folder (a tiny random VLM, built once into the cache: no pretrained VLM ships in a wheel)
and the dataset ("What digit is this?" chats over the wheel's 1,617 training digits) are graph nodes, so
building the recipe stays I/O-free. Full SFT by default, vision tower included: a random tower has to
learn to see.

    python recipes/vlm_digits.py trainer.max_steps=50 --yes
    nemo automodel finetune --factory vlm_digits --dryrun
"""

from __future__ import annotations

import nemo_run as run

from nemo_automodel import api
from nemo_automodel.demo import digits
from recipes import hf_auto_model_for_image_text_to_text as base
from recipes.optim import pytorch_adam_with_cosine_annealing


@run.cli.factory(target=api.finetune, name="vlm_digits")
def finetune_recipe(dir: str = "runs", name: str = "vlm-digits", family: str = "idefics3",
                    peft_scheme: str | None = None, max_steps: int = 400, lr: float = 2e-3,
                    samples: int | None = None, micro_batch_size: int = 16, seq_length: int = 128) -> run.Partial:
    """Full SFT (or LoRA with ``peft_scheme='lora'``) of a tiny ``family`` VLM on the digits' training split."""
    recipe = base.finetune_recipe(run.Config(digits.base_model_dir, family=family), peft_scheme=peft_scheme,
                                  dir=dir, name=name, max_steps=max_steps, seq_length=seq_length,
                                  micro_batch_size=micro_batch_size, global_batch_size=micro_batch_size)
    recipe.model.freeze_vision_tower = peft_scheme is not None  # full SFT trains the random tower too
    recipe.data = base.data(run.Config(digits.digit_chats, split="train", limit=samples), seq_length,
                            micro_batch_size, micro_batch_size)
    recipe.optim = pytorch_adam_with_cosine_annealing(max_lr=lr, warmup_steps=10)
    return recipe


if __name__ == "__main__":  # python recipes/vlm_digits.py trainer.max_steps=5 --yes (see recipes/cli.py)
    from recipes.cli import main

    main(finetune_recipe)
