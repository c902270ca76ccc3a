"""The repeated decoder layers of a HF model, and activation checkpointing on them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nemo_automodel.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks: modules of the classes that the HF model, or any HF model inside it (a VLM's
    language model and vision tower), lists as ``_no_split_modules``; the outermost ones only, in order."""
    names = {n for m in module.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    blocks: list[torch.nn.Module] = []
    inside: set[int] = set()
    for m in module.modules():  # pre-order: a block comes before the modules it contains
        if id(m) in inside:
            continue
        if type(m).__name__ in names:
            blocks.append(m)
            inside.update(id(sub) for sub in m.modules())
    return blocks


def enable_activation_checkpointing(model: PreTrainedModel) -> int:
    """Recompute each decoder layer's activations in backward (non-reentrant); returns the layer count.

    Uses transformers' own switch, so module names (peft targets, checkpoints) are unchanged and it
    acts only in training mode. Non-reentrant checkpointing needs no ``requires_grad`` on the inputs
    (LoRA's frozen embeddings are fine), restores the RNG for the recompute (dropout masks match) and
    composes with FSDP2 and ``torch.compile``.
    """
    layers = decoder_layers(model)
    if not layers or not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"activation_checkpointing=True: {type(model).__name__} has no repeated decoder layers "
                          "that transformers can checkpoint; set activation_checkpointing=False")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return len(layers)
