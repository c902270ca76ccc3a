"""LoRA on any HF causal LM, built on the `peft` library (its layers and its adapter format)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from nemo_automodel.errors import ConfigError, validated
from nemo_automodel.peft.targets import describe_targets, resolve_targets, summarize

DEFAULT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


class LoRA:
    """Low-rank adapters on the layers selected by ``target_modules``.

    Args:
        target_modules: wildcards, regexes, plain names or Megatron aliases (see peft.targets).
        exclude_modules: same syntax; removed from the selection.
        dim: adapter rank. alpha: scaling numerator (scale = alpha / dim).
        dropout: dropout on the adapter path. dropout_position: ``pre`` (on the adapter input,
            what peft implements); ``post`` is accepted only with dropout=0.
        use_dora: DoRA (weight-decomposed LoRA: a trained magnitude per output feature on top of the
            low-rank direction update). HF path only; vLLM cannot serve DoRA adapters (export merged).
        use_rslora: rank-stabilised LoRA: scale = alpha / sqrt(dim) instead of alpha / dim.
    """

    @validated
    def __init__(self, target_modules: str | list[str] | tuple[str, ...] = DEFAULT_TARGETS,
                 exclude_modules: list[str] | tuple[str, ...] = (), dim: Annotated[int, Field(ge=1)] = 8,
                 alpha: Annotated[float, Field(gt=0)] = 32, dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
                 dropout_position: Literal["pre", "post"] = "pre", use_dora: bool = False,
                 use_rslora: bool = False) -> None:
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        if dropout_position == "post" and dropout > 0:
            raise ConfigError("dropout_position='post' is not supported with dropout>0: peft applies "
                              "LoRA dropout to the adapter input; use dropout_position='pre'")
        self.target_modules = list(target_modules)
        self.exclude_modules = list(exclude_modules)
        self.dim, self.alpha, self.dropout = dim, alpha, dropout
        self.use_dora, self.use_rslora = use_dora, use_rslora

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``: alpha / dim, or alpha / sqrt(dim) with rsLoRA."""
        return self.alpha / (self.dim ** 0.5 if self.use_rslora else self.dim)

    def apply(self, module: torch.nn.Module, within: list[str] | None = None) -> torch.nn.Module:
        """Wrap a HF model in a peft ``PeftModel`` with only the adapters trainable; ``within`` limits the
        targets to layers under those module prefixes (a VLM's language model).

        Models of other backends call this through their ``apply_peft`` and may read the fields
        instead (Megatron-Core: ``megatron/lora.py`` resolves the same targets onto its fused layers).
        """
        from peft import LoraConfig, get_peft_model

        chosen = resolve_targets(module, self.target_modules, self.exclude_modules, within)
        if chosen.parameters and self.use_dora:
            raise ConfigError(f"use_dora=True: peft has no DoRA for fused expert weights ({summarize(chosen.parameters)}"
                              "); use LoRA, or exclude_modules=['experts']")
        if chosen.parameters and self.dropout:
            raise ConfigError(f"dropout={self.dropout}: peft has no LoRA dropout for fused expert weights "
                              f"({summarize(chosen.parameters)}); set dropout=0, or exclude_modules=['experts']")
        if int(os.environ.get("RANK", "0")) == 0:
            print("\n".join([f"LoRA r={self.dim} on {type(module).__name__}:",
                              *(f"  {line}" for line in describe_targets(module, chosen, within))]), flush=True)
        # peft annotates lora_alpha as int; a float alpha scales the same (alpha / r)
        config = LoraConfig(r=self.dim, lora_alpha=self.alpha,  # type: ignore[arg-type]
                            lora_dropout=self.dropout, target_modules=chosen.modules or None,
                            target_parameters=chosen.parameters or None, bias="none", task_type="CAUSAL_LM",
                            use_dora=self.use_dora, use_rslora=self.use_rslora)
        with _targets_as_resolved():
            return get_peft_model(module, config)


@contextlib.contextmanager
def _targets_as_resolved(active: bool = True) -> Iterator[None]:
    """Inject a LoRA config as written. peft (0.21, on transformers 5) rewrites the config of every family that
    transformers converts from the transformers-4 expert layout (``_convert_peft_config_moe``; DeepSeek-V2/V3,
    Qwen2/3-MoE, Qwen3-Next, GLM-4-MoE, ... convert like Qwen2-MoE): each target named ``gate_proj``, ``up_proj``
    or ``down_proj`` is taken for a transformers-4 expert and moved to ``target_parameters``, so the dense MLP
    and shared-expert layers of those families silently get no adapter (and ``target_parameters`` gains bare
    ``gate_up_proj``/``down_proj``). Our targets are resolved on the loaded model, the experts already named as
    parameters: nothing to convert. Private peft API, pinned with peft; without it peft does as it does."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:
        yield
        return
    real = conversion.convert_peft_config_for_transformers
    if active:
        conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = real


def _adapter_keys(adapter_dir: str | Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as f:
        return list(f.keys())  # safe_open is not a mapping


def adapter_modules(adapter_dir: str | Path) -> list[str]:
    """The base-model module names that carry LoRA weights in a saved ``adapter_model.safetensors``."""
    names: dict[str, None] = {}
    for key in _adapter_keys(adapter_dir):
        if ".lora_" in key:
            names[key.removeprefix("base_model.model.").split(".lora_")[0]] = None
    return list(names)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Merge a saved PEFT adapter into its base model and write a plain HF model folder (with the
    processor for a vision-language base, else the tokenizer). The base loads with the auto class
    whose layers the adapter names (``AutoModelForImageTextToText`` or ``AutoModelForCausalLM``)."""
    from peft import PeftConfig, PeftModel

    from nemo_automodel.models.hf_loading import auto_model_class, kind_with_modules, load_config
    from nemo_automodel.models.processor import load_processor
    from nemo_automodel.models.tokenizer import load_tokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"adapter_dir={str(adapter_dir)!r} has no adapter_config.json: pass a hf_adapter/ folder")
    base = base_model or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    kind, _ = kind_with_modules(load_config(base), adapter_modules(adapter_dir))
    model = auto_model_class(kind).from_pretrained(base, dtype=torch.float32)
    # an adapter saved from a transformers-4 mixture of experts (one module per expert: ``experts.0.w1``) loads
    # through peft's conversion; ours name the transformers-5 layers they adapted (see _targets_as_resolved)
    keys = _adapter_keys(adapter_dir)
    with _targets_as_resolved(active=not any(re.search(r"\.experts\.\d+\.", k) for k in keys)):
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    load = load_processor if kind == "image_text_to_text" else load_tokenizer
    load(str(tok_src)).save_pretrained(out_dir)
    return out_dir


class DoRA(LoRA):
    """NeMo's ``llm.peft.DoRA``: ``LoRA`` with ``use_dora=True`` (same arguments)."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("use_dora", True)
        super().__init__(**kwargs)


def tensor_parallel_parts(name: str, module: torch.nn.Module, style: str) -> list[str] | None:
    """The names of the parts of peft LoRA layer ``name`` that shard when it is planned ``style`` for tensor
    parallel (None when ``module`` is not a peft LoRA layer): colwise shards ``base_layer`` and ``lora_B``,
    rowwise ``base_layer`` and ``lora_A``; the other factor stays replicated, so each rank's adapter output
    has the shape of its base output. DoRA's magnitude vector spans the whole output and is refused."""
    adapters = getattr(module, "lora_A", None)
    if not (hasattr(module, "base_layer") and isinstance(adapters, torch.nn.ModuleDict)):
        return None
    if getattr(module, "lora_magnitude_vector", None):
        raise ConfigError(f"DoRA cannot be tensor-parallel ({name}): use LoRA or tensor_parallel_size=1")
    factor = "lora_B" if style == "colwise" else "lora_A"
    return [f"{name}.base_layer", *(f"{name}.{factor}.{a}" for a in adapters)]
