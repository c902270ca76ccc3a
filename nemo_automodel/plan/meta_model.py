"""The model on the meta device, built from its Hugging Face config alone: no weight is read.

The config comes from ``models.hf_loading.load_config(..., local_files_only=True)`` (a local folder or
the local Hugging Face cache, never the network). ``build_meta_model`` builds the causal LM on the meta
device, optionally with fewer decoder layers, then applies activation checkpointing and the PEFT method exactly as
``HFAutoModelForCausalLM`` does; ``shard_tensor_parallel`` gives it the shapes of one tensor-parallel
rank; ``parameters_of`` lists what the parameters are.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass
from typing import Any, cast

import torch

from nemo_automodel.contracts import PeftMethod
from nemo_automodel.errors import ConfigError, first_line
from nemo_automodel.models.chunked_ce import output_layer
from nemo_automodel.models.hf_loading import ATTN_FALLBACKS
from nemo_automodel.models.layers import decoder_layers, enable_activation_checkpointing


def architecture(config) -> str:
    """The model class named by the config (``LlamaForCausalLM``), else its model type."""
    return (getattr(config, "architectures", None) or [config.model_type])[0]


@dataclass
class MetaModel:
    """A meta-device causal LM ready for a training step (adapters and checkpointing applied)."""

    module: torch.nn.Module
    blocks: list[torch.nn.Module]
    config: Any


def _truncated(config, layers: int | None):
    if layers is None or layers >= config.num_hidden_layers:
        return config
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    return config


def _about_attention(err: Exception) -> bool:
    """Whether a load error is about the attention kernel (the real load then tries the next one)."""
    return isinstance(err, (ValueError, ImportError)) and any(w in str(err).lower() for w in ("attn", "attention"))


def build_meta_model(config, dtype: torch.dtype, peft: PeftMethod | None = None, activation_checkpointing: bool = False,
                     layers: int | None = None, trust_remote_code: bool = False) -> MetaModel:
    """Build ``config``'s causal LM on the meta device in ``dtype``, with ``layers`` decoder layers
    (default: all), then checkpointing and ``peft.apply`` as the real model gets them."""
    import transformers

    config = _truncated(config, layers)
    module = None
    for attn in ATTN_FALLBACKS:  # sdpa, else eager: the attention the real load falls back to (hf_loading)
        try:
            with torch.device("meta"):
                module = transformers.AutoModelForCausalLM.from_config(
                    config, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code)
            break
        except Exception as err:
            if attn == ATTN_FALLBACKS[-1] or not _about_attention(err):
                raise ConfigError(f"cannot estimate the memory of {architecture(config)}: transformers cannot build "
                                  f"it as a causal LM with {attn} attention ({first_line(err)})") from None
    assert module is not None
    module.config.use_cache = False
    module.train()
    if activation_checkpointing:
        enable_activation_checkpointing(module)
    if peft is not None:
        # adapters are created (and initialised) on meta; the "LoRA r=… on …" summary is the trainer's to print,
        # not each rehearsal's (a plan builds the model several times)
        with torch.device("meta"), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes, seen by peft
            module = peft.apply(module)
        module.train()
    return MetaModel(module, decoder_layers(module), config)


def shard_tensor_parallel(model: MetaModel, tp_size: int, tp_plan: dict[str, str] | None = None) -> None:
    """Give ``model`` (in place) the shapes one of ``tp_size`` tensor-parallel ranks holds, by the same plan
    ``FSDP2Strategy`` applies (``parallel/tensor_parallel.py``: the model's ``base_model_tp_plan`` or
    ``tp_plan``, LoRA per part): a colwise Linear keeps out_features / T outputs (and bias), a rowwise one
    in_features / T inputs (bias whole). Everything the plan leaves out (embeddings, norms, the output
    layer in transformers' base plans) stays whole. Attention reshapes with ``-1`` heads, so the step
    then computes on the local heads and its activations are one rank's."""
    from nemo_automodel.models.hf_parallel import hf_tensor_parallel_plan
    from nemo_automodel.parallel.tensor_parallel import check_divisors, concrete_plan, resolve_plan

    plan = hf_tensor_parallel_plan(model.module)
    styles = resolve_plan(plan, tp_plan)
    check_divisors(plan, tp_size)
    for name, style in concrete_plan(plan.root, styles, tp_size).items():
        layer = cast(torch.nn.Linear, plan.root.get_submodule(name))  # concrete_plan checked it is a Linear
        if style == "colwise":
            layer.out_features //= tp_size
        else:
            layer.in_features //= tp_size
        for attr in ("weight", "bias") if style == "colwise" else ("weight",):
            old = getattr(layer, attr)
            if old is not None:
                shape = (layer.out_features, layer.in_features)[:old.dim()]
                setattr(layer, attr, torch.nn.Parameter(torch.empty(shape, dtype=old.dtype, device="meta"),
                                                        requires_grad=old.requires_grad))


def repeats_identically(model: MetaModel) -> bool:
    """Whether every decoder layer has the same class, parameters and layer type (then a few layers
    tell the memory of all of them)."""
    def signature(block: torch.nn.Module) -> tuple:
        return type(block).__name__, tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters())

    types = getattr(model.config, "layer_types", None)
    return (len(model.blocks) > 0 and len({signature(b) for b in model.blocks}) == 1
            and (not isinstance(types, list) or len(set(types)) <= 1))


@dataclass(frozen=True)
class ParamInfo:
    """One parameter: its size, dtype, whether it trains, its decoder layer (None outside the
    layers) and whether a 4-bit base would quantize it (a frozen linear weight other than the
    output layer)."""

    numel: int
    dtype: torch.dtype
    trainable: bool
    block: int | None
    quantizable: bool


def parameters_of(model: MetaModel, total_layers: int | None = None) -> list[ParamInfo]:
    """The parameters of ``model``; with ``total_layers`` above the layers built, the last layer's
    parameters stand for the missing ones (layers that repeat identically)."""
    module = model.module
    head = output_layer(module)
    linear_weights = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Linear) and m is not head}
    block_of = {id(p): i for i, block in enumerate(model.blocks) for p in block.parameters()}
    seen: set[int] = set()
    infos = []
    for p in module.parameters():  # shared (tied) parameters once
        if id(p) in seen:
            continue
        seen.add(id(p))
        infos.append(ParamInfo(p.numel(), p.dtype, p.requires_grad, block_of.get(id(p)),
                               id(p) in linear_weights and not p.requires_grad))
    built = len(model.blocks)
    if total_layers and total_layers > built and built:
        last = [i for i in infos if i.block == built - 1]
        for extra in range(built, total_layers):
            infos += [ParamInfo(i.numel, i.dtype, i.trainable, extra, i.quantizable) for i in last]
    return infos
