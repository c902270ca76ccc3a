"""LoRA target selection on Megatron-Core layers, with the same ``target_modules`` as on HF models.

Each Megatron linear stands for HF layers: ``linear_qkv`` for q/k/v_proj, ``linear_proj`` for
o_proj, ``linear_fc1`` for gate/up_proj, ``linear_fc2`` for down_proj. A pattern selects a
Megatron layer when it matches the layer's own name or all of its HF counterparts, so
``['*_proj', 'linear_qkv']`` selects the same computation on both backends. A pattern that
matches only part of a fused layer (``q_proj`` alone) cannot be honoured and is an error.

The adapter layer is written here: peft 0.21's Megatron dispatch fails before building a layer
(``KeyError: 'fan_in_fan_out'``) and its forward adds the ``(output, bias)`` tuples that Megatron
linears return. Ours follows peft's design and names (``base_layer``, ``lora_A``, ``lora_B``,
scale alpha/r, B initialised to zero) and peft's tensor-parallel layout: on a column-parallel
layer A is replicated and B column-parallel; on a row-parallel layer A is row-parallel and B
replicated. The model then carries a peft ``LoraConfig`` as ``peft_config['default']``.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from typing import cast

import torch

from nemo_automodel.contracts import PeftMethod
from nemo_automodel.errors import ConfigError
from nemo_automodel.megatron.convert import LORA_HF_NAMES
from nemo_automodel.peft.targets import pattern_matcher, summarize


def hf_counterparts(name: str) -> list[str]:
    """HF module names computed by the Megatron layer ``name`` (empty for non-decoder layers)."""
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in LORA_HF_NAMES:
        return []
    return [f"model.layers.{m.group(1)}.{hf}" for hf in LORA_HF_NAMES[m.group(2)]]


def _selects(pattern: str, name: str) -> bool:
    match = pattern_matcher(pattern)
    if match(name):
        return True
    hits = [match(hf) for hf in hf_counterparts(name)]
    if any(hits) and not all(hits):
        fused = ", ".join(hf.rsplit(".", 1)[1] for hf in hf_counterparts(name))
        raise ConfigError(f"LoRA pattern {pattern!r} selects part of Megatron's fused {name.rsplit('.', 1)[1]} "
                          f"({fused}): select all of them or the fused name")
    return bool(hits)


def resolve_megatron_targets(model: torch.nn.Module, target_modules: list[str], exclude_modules: list[str]) -> list[str]:
    """Full names of the Megatron parallel linears selected by the (HF or Megatron) patterns."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    names = [n for n, m in model.named_modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear)]
    selected = [n for n in names if any(_selects(p, n) for p in target_modules)]
    selected = [n for n in selected if not any(_selects(p, n) for p in exclude_modules)]
    if not selected:
        raise ConfigError(f"LoRA target_modules={target_modules} (exclude_modules={exclude_modules}) match no layer "
                          f"of the Megatron GPTModel; candidates: {summarize(names)}")
    return selected


class LoRAParallelLinear(torch.nn.Module):
    """``base(x) + B(A(dropout(x))) * scaling`` around a Megatron Column/RowParallelLinear
    (``scaling`` = alpha / r, or alpha / sqrt(r) with rsLoRA)."""

    def __init__(self, base: torch.nn.Module, name: str, r: int, scaling: float, dropout: float) -> None:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        cfg = base.config
        self.scaling, self.dropout = scaling, torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        gen = torch.Generator().manual_seed(torch.initial_seed() + zlib.crc32(name.encode()))
        kaiming = functools.partial(_kaiming_uniform, generator=gen)  # peft's A init, same on every TP rank
        if isinstance(base, RowParallelLinear):
            self.lora_A = RowParallelLinear(base.input_size, r, config=cfg, init_method=kaiming, bias=False,
                                            input_is_parallel=True, skip_bias_add=True)
            self.lora_B = torch.nn.Linear(r, base.output_size, bias=False)
        else:
            self.lora_A = torch.nn.Linear(cast(int, base.input_size), r, bias=False)  # a Megatron parallel linear
            self.lora_B = ColumnParallelLinear(r, base.output_size, config=cfg, init_method=torch.nn.init.zeros_,
                                               bias=False, gather_output=False)
            kaiming(self.lora_A.weight)
        torch.nn.init.zeros_(self.lora_B.weight)
        dtype = next(base.parameters()).dtype
        self.to(device=next(base.parameters()).device, dtype=dtype)
        self.base_layer.to(dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base_layer(x, *args, **kwargs)
        a = self.lora_A(self.dropout(x))
        b = self.lora_B(a[0] if isinstance(a, tuple) else a)
        b = b[0] if isinstance(b, tuple) else b
        return out + b * self.scaling, bias


def _kaiming_uniform(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's (and peft's lora_A) default init, from a given generator."""
    bound = 1 / math.sqrt(weight.shape[1])  # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    with torch.no_grad():
        return weight.copy_(torch.empty(weight.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator))


def apply_megatron_lora(model: torch.nn.Module, peft: PeftMethod) -> torch.nn.Module:
    """Freeze ``model`` and wrap the layers ``peft`` (a ``contracts.PeftMethod``) selects in
    `LoRAParallelLinear`; returns the same model."""
    from peft import LoraConfig

    names = resolve_megatron_targets(model, peft.target_modules, peft.exclude_modules)
    r, alpha, dropout = peft.dim, peft.alpha, peft.dropout
    refuse_dora(peft)
    rslora = bool(getattr(peft, "use_rslora", False))
    scaling = alpha / (r ** 0.5 if rslora else r)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRAParallelLinear(getattr(parent, child), name, r, scaling, dropout))
    # peft annotates lora_alpha as int; a float alpha scales the same (alpha / r)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,  # type: ignore[arg-type]
                        target_modules=names, bias="none", use_rslora=rslora)
    # torch types Module.__setattr__ values as Tensor | Module; a dict is stored like any attribute
    model.peft_config = {"default": config}  # type: ignore[assignment]
    return model


def refuse_dora(peft: PeftMethod) -> None:
    """DoRA has no Megatron implementation here: one line, before anything loads."""
    if getattr(peft, "use_dora", False):
        raise ConfigError("use_dora=True (DoRA) is not implemented on the Megatron-Core path: train it on the "
                          "AutoModel path (to_automodel), or use plain LoRA (use_rslora=True is supported)")
