"""Builders shared by the VLM export tests (a module of its own: test files cannot import conftest):
training a tiny VLM in-process on a few image chats, and its inputs and logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fiddle as fdl
import torch
from datasets import Dataset

from nemo_automodel import lightning as nl
from nemo_automodel import llm

QUESTION = "What digit is this?"


def image(i: int) -> Any:
    """A fixed 28x28 RGB image per ``i``: a bright bar at an ``i``-dependent column on noise."""
    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(i).randint(0, 64, size=(28, 28, 3)).astype("uint8")
    pixels[4:24, 3 + 4 * i:7 + 4 * i] = 255
    return Image.fromarray(pixels)


def reply(i: int) -> str:
    return f"The digit is {i}."


def rows(n: int = 4) -> Dataset:
    """``n`` image chats: the question about ``image(i)`` answered with ``reply(i)``."""
    return Dataset.from_list([
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                      {"role": "assistant", "content": [{"type": "text", "text": reply(i)}]}],
         "images": [image(i)]} for i in range(n)])


def train(base: Path, log_dir: Path, name: str, *, lora: bool, steps: int, lr: float = 1e-2,
          ) -> tuple[Path, llm.HFAutoModelForImageTextToText]:
    """``llm.api.finetune`` in this process (LoRA on the language model, or full SFT); the run directory
    and the trained model object (its ``.model`` is the trained module)."""
    model = llm.HFAutoModelForImageTextToText(str(base))
    run = llm.api.finetune(
        model=model, peft=llm.peft.LoRA(target_modules=["*_proj"], dim=8, alpha=16) if lora else None,
        data=llm.HFImageTextDataModule(rows(), seq_length=128, micro_batch_size=2, global_batch_size=4),
        optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=lr)),
        trainer=nl.Trainer(max_steps=steps, log_every_n_steps=1, enable_progress_bar=False),
        log=nl.NeMoLogger(log_dir=str(log_dir), name=name),
    )
    model.model.eval()
    return run, model


def prompt_inputs(processor: Any, i: int) -> dict[str, torch.Tensor]:
    """The processor's encoding of the question about ``image(i)`` with the generation prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text], images=[[image(i)]], return_tensors="pt", add_special_tokens=False))


@torch.no_grad()
def logits(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return module(**inputs, use_cache=False).logits
