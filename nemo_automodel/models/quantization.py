"""QLoRA's 4-bit base through bitsandbytes: the ``quantization=`` values, the load arguments, the
preparation for training, and the one-line refusals of what a 4-bit base cannot do.

``HFAutoModelForCausalLM(quantization=...)`` takes plain values (they fit a Fiddle graph and the
CLI): ``"nf4"``, ``"fp4"``, or a dict of ``transformers.BitsAndBytesConfig`` 4-bit arguments
(``{"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}``); compute dtype bf16 unless
the dict says otherwise. This module is the only one that knows bitsandbytes; it imports it on use.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from nemo_automodel.contracts import PeftMethod
from nemo_automodel.errors import ConfigError, bad_value

INSTALL = "pip install '.[qlora]'"
QUANT_TYPES = ("nf4", "fp4")
# The BitsAndBytesConfig arguments of a 4-bit base. Not offered: 8-bit and CPU offload;
# bnb_4bit_quant_storage (for FSDP-sharded 4-bit bases, which are refused); llm_int8_skip_modules
# (it replaces transformers' own list, so the output layer would be quantized too).
CONFIG_KEYS = ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant")
DEFAULTS = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}
COMPUTE_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                  "float32": "float32", "fp32": "float32"}
EXPECTED = "use 'nf4', 'fp4', a dict of BitsAndBytesConfig 4-bit arguments, or None"


def resolve_quantization(value: Any, require_installed: bool = True) -> dict[str, Any] | None:
    """``quantization=`` as complete BitsAndBytesConfig keyword arguments of plain values, or None.

    Checks the value without importing anything heavy, then (``require_installed``; the memory
    planner needs no bitsandbytes) that bitsandbytes is installed: each problem is a one-line
    ConfigError before any weights load.
    """
    if value is None:
        return None
    given = value
    if isinstance(value, str):
        value = {"bnb_4bit_quant_type": value.lower()}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise bad_value("quantization", given, EXPECTED)
    unknown = sorted(set(value) - set(CONFIG_KEYS))
    if unknown:
        raise bad_value("quantization", given, f"unknown argument(s) {unknown}: a 4-bit base takes {list(CONFIG_KEYS)}")
    kwargs = {**DEFAULTS, **value}
    if isinstance(kwargs["bnb_4bit_quant_type"], str):
        kwargs["bnb_4bit_quant_type"] = kwargs["bnb_4bit_quant_type"].lower()
    if kwargs["load_in_4bit"] is not True:
        raise bad_value("quantization", given, "only 4-bit bases are supported (load_in_4bit=True)")
    if kwargs["bnb_4bit_quant_type"] not in QUANT_TYPES:
        raise bad_value("quantization", given, f"the 4-bit type must be one of {list(QUANT_TYPES)}")
    compute = str(kwargs["bnb_4bit_compute_dtype"]).removeprefix("torch.")
    if compute not in COMPUTE_DTYPES:
        raise bad_value("quantization", given, f"bnb_4bit_compute_dtype must be one of {sorted(COMPUTE_DTYPES)}")
    kwargs["bnb_4bit_compute_dtype"] = COMPUTE_DTYPES[compute]
    if not isinstance(kwargs.get("bnb_4bit_use_double_quant", False), bool):
        raise bad_value("quantization", given, "bnb_4bit_use_double_quant must be True or False")
    if require_installed:
        require_bitsandbytes()
    return kwargs


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"quantization needs bitsandbytes, which is not installed: {INSTALL}")


def load_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The ``from_pretrained`` arguments of a 4-bit base ({} without quantization).

    Without a ``device_map`` transformers quantizes onto the current CUDA device (the strategy has
    set it), else the CPU; ``configure_model``'s ``.to(device)`` then moves nothing.
    """
    if not kwargs:
        return {}
    from transformers import BitsAndBytesConfig

    kwargs = {**kwargs, "bnb_4bit_compute_dtype": getattr(torch, kwargs["bnb_4bit_compute_dtype"])}
    return {"quantization_config": BitsAndBytesConfig(**kwargs)}


def linear4bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The bitsandbytes 4-bit linear layers of ``model`` (none when bitsandbytes is not imported)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    return [] if bnb is None else [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def after_load(model: torch.nn.Module) -> torch.nn.Module:
    """Make a freshly loaded 4-bit model safe to train on CPU.

    bitsandbytes (0.50.2) repacks a ``Linear4bit``'s weight into an AVX512-BF16 layout on its first
    forward in eval mode without grad (our validation, a logits check), when the CPU has that
    instruction set. From then on training goes through ``gemv_4bit``, which has no autograd (the
    LoRA gradients come out ~90 % wrong, silently), ``state_dict()`` returns corrupted base weights,
    and out_features not divisible by 32 raise ``N must be divisible by block_n``. Turning the fast
    path off on every layer before anything runs avoids all three (measured: gradients identical
    before and after an eval forward). It is a CPU-only path; CUDA is unaffected.
    """
    for layer in linear4bit_layers(model):
        # torch types Module.__setattr__ values as Tensor | Module; a flag is stored like any attribute
        layer.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
    return model


def prepare_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """peft's ``prepare_model_for_kbit_training`` minus what we decide elsewhere.

    - ``use_gradient_checkpointing=False``: the model's own ``activation_checkpointing`` flag
      decides (peft would otherwise turn it on, reentrant, for every QLoRA run).
    - peft upcasts every fp16/bf16 parameter that is not 4-bit (norms, embeddings, lm_head) to
      fp32. fp16 norms overflow, so an fp16 model is upcast as peft does; a bf16 model (``torch_dtype``
      or ``precision='bf16-true'``) keeps those frozen weights bf16, which is what the user asked for
      (bf16 has fp32's range; bf16-true LoRA keeps them bf16 too). The default fp32 needs no upcast.
    LoRA adapters are fp32 in every case (peft's ``autocast_adapter_dtype``).
    """
    from peft import prepare_model_for_kbit_training

    dtypes = {p.dtype for p in model.parameters() if type(p).__name__ != "Params4bit"}
    if torch.bfloat16 in dtypes:
        for param in model.parameters():
            param.requires_grad_(False)
    else:
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return after_load(model)


def check_trainable(quantization: dict[str, Any] | None, peft: PeftMethod | None, strategy: str) -> None:
    """Refuse, in one line and before anything loads, what a 4-bit base cannot train (``strategy``: its name)."""
    if quantization is None:
        return
    kind = quantization["bnb_4bit_quant_type"]
    if peft is None:
        raise ConfigError(f"quantization={kind!r} needs peft (LoRA): full fine-tuning cannot update a frozen "
                          "4-bit base; pass peft=LoRA(...) or drop quantization")
    if strategy == "fsdp2":
        raise ConfigError(f"quantization={kind!r} cannot be sharded by strategy='fsdp2' (bitsandbytes' Params4bit "
                          "keeps its quantization state outside the tensor FSDP2 shards): use strategy='ddp' "
                          "or one device")


QUANT_STATE_KEY = ".quant_state.bitsandbytes__"  # bitsandbytes' packed QuantState: "<weight>.quant_state.bitsandbytes__nf4"
QUANT_STATE_TENSORS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def drop_quant_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the quantization state bitsandbytes writes beside each frozen 4-bit weight.

    ``ignore_frozen_params`` drops the packed 4-bit weights from a checkpoint but not their per-block
    scales (``<weight>.absmax``: 0.5 bit per weight, about 1/9 of the 4-bit base) and code tables,
    which ``Linear4bit`` adds to ``state_dict()`` as plain tensors. They come from the pretrained model
    again on resume, like the weights they belong to.
    """
    weights = [k.split(QUANT_STATE_KEY)[0] for k in state if QUANT_STATE_KEY in k]
    if not weights:
        return state
    drop = {k for k in state if QUANT_STATE_KEY in k}
    drop.update(f"{w}.{name}" for w in weights for name in QUANT_STATE_TENSORS)
    return {k: v for k, v in state.items() if k not in drop}
