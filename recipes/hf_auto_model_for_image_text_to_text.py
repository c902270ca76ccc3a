"""Fine-tune any Hugging Face vision-language model (image + text chats) on the AutoModel path.

    recipe = finetune_recipe("HuggingFaceTB/SmolVLM-256M-Instruct", dataset="data/train.jsonl")
    run.run(recipe, direct=True)                                  # in this process

From the shell (`recipes/cli.py` has the override syntax, executors and sweeps):
    python recipes/hf_auto_model_for_image_text_to_text.py model.model_id=Qwen/Qwen2-VL-2B-Instruct --yes
    nemo automodel finetune --factory hf_auto_model_for_image_text_to_text peft=None --dryrun

The same LoRA target list as for text models works: targets resolve on the language model (the vision
tower stays frozen unless ``model.freeze_vision_tower=False``).
"""

from __future__ import annotations

from typing import Any

import nemo_run as run

from nemo_automodel import api
from nemo_automodel.checkpoint import AutoResume
from nemo_automodel.data import HFImageTextDataModule
from nemo_automodel.models import HFAutoModelForImageTextToText
from recipes.hf_auto_model_for_causal_lm import logger, peft_and_lr, trainer
from recipes.optim import pytorch_adam_with_flat_lr


def model(model_id: Any, torch_dtype: str = "float32", freeze_vision_tower: bool = True) -> run.Config:
    """The VLM node; ``model_id`` may itself be a node that yields a local folder."""
    return run.Config(HFAutoModelForImageTextToText, model_id=model_id, torch_dtype=torch_dtype,
                      freeze_vision_tower=freeze_vision_tower)


def data(dataset: Any, seq_length: int = 1024, micro_batch_size: int = 2, global_batch_size: int = 8,
         val_split: str | None = None, **kwargs: Any) -> run.Config:
    """Image + text chats (``messages`` and optional ``images`` columns) from a Hub name, file or node."""
    return run.Config(HFImageTextDataModule, path_or_dataset=dataset, seq_length=seq_length,
                      micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, val_split=val_split,
                      **kwargs)


@run.cli.factory(target=api.finetune, name="hf_auto_model_for_image_text_to_text")
def finetune_recipe(model_id: Any = "HuggingFaceTB/SmolVLM-256M-Instruct",
                    dataset: Any = "HuggingFaceH4/llava-instruct-mix-vsft", peft_scheme: str | None = "lora",
                    dir: str = "nemo_experiments", name: str = "finetune_vlm", num_nodes: int = 1,
                    num_gpus_per_node: int = 1, max_steps: int = 100, lr: float | None = None,
                    seq_length: int = 1024, micro_batch_size: int = 2, global_batch_size: int = 8,
                    strategy: str | None = None, precision: str = "auto") -> run.Partial:
    """LoRA (``peft_scheme='lora'``) or full SFT (``None``) of a vision-language ``model_id`` on ``dataset``."""
    peft, default_lr = peft_and_lr(peft_scheme)
    return run.Partial(
        api.finetune,
        model=model(model_id),
        peft=peft,
        data=data(dataset, seq_length, micro_batch_size, global_batch_size),
        optim=pytorch_adam_with_flat_lr(lr=lr or default_lr),
        trainer=trainer(max_steps, num_nodes, num_gpus_per_node, strategy, precision),
        log=logger(dir, name),
        resume=run.Config(AutoResume, resume_if_exists=True),
    )


if __name__ == "__main__":  # python recipes/hf_auto_model_for_image_text_to_text.py model.model_id=… --yes
    from recipes.cli import main

    main(finetune_recipe)
