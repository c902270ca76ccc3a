"""What a transformers model tells the strategies (``contracts.TrainableModel``): its repeated blocks, its
tensor- and expert-parallel plans and whether its attention can run context parallel, read from the internals
transformers and peft own (``_no_split_modules``, ``config.base_model_tp_plan``, ``config.base_model_ep_plan``,
``config._attn_implementation``, ``get_base_model``). The strategies in ``parallel/`` ask; they never read these
themselves."""

from __future__ import annotations

import torch

from nemo_automodel.contracts import ExpertParallelPlan, TensorParallelPlan
from nemo_automodel.errors import ConfigError
from nemo_automodel.models.layers import decoder_layers

HEAD_COUNTS = ("num_attention_heads", "num_key_value_heads")  # TP splits attention by whole heads


def hf_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (the module itself otherwise)."""
    get_base = getattr(module, "get_base_model", None)
    return get_base() if callable(get_base) else module


def hf_tensor_parallel_plan(module: torch.nn.Module) -> TensorParallelPlan:
    """transformers' own plan (``config.base_model_tp_plan``, patterns relative to the decoder stack, e.g.
    ``LlamaModel`` in ``LlamaForCausalLM``) and the head counts TP must divide."""
    hf = hf_model(module)
    config = getattr(hf, "config", None)
    heads = {f: n for f in HEAD_COUNTS if isinstance(n := getattr(config, f, None), int)}
    name = type(hf).__name__
    return TensorParallelPlan(root=getattr(hf, "base_model", hf), styles=getattr(config, "base_model_tp_plan", None),
                              model=name, source=f"{name}'s base_model_tp_plan", divisible=heads)


def hf_expert_parallel_plan(module: torch.nn.Module) -> ExpertParallelPlan:
    """transformers' own expert plan (``config.base_model_ep_plan``, relative to the decoder stack) and the
    routed experts per layer (``num_experts``; Mixtral and DeepSeek-V3 map their own names onto it)."""
    hf = hf_model(module)
    config = getattr(hf, "config", None)
    name = type(hf).__name__
    experts = getattr(config, "num_experts", None)
    return ExpertParallelPlan(root=getattr(hf, "base_model", hf), styles=getattr(config, "base_model_ep_plan", None),
                              model=name, source=f"{name}'s base_model_ep_plan",
                              num_experts=experts if isinstance(experts, int) else None)


def hf_context_parallel_problem(module: torch.nn.Module) -> str | None:
    """Context parallel replaces ``F.scaled_dot_product_attention``: the model must run it."""
    impl = getattr(getattr(hf_model(module), "config", None), "_attn_implementation", None)
    if impl == "sdpa":
        return None
    return f"attn_implementation='sdpa' (the model uses {impl!r}): set HFAutoModelForCausalLM(attn_implementation='sdpa')"


class HFShardingUnits:
    """The ``contracts.TrainableModel`` members that describe a loaded HF model's sharding units."""

    model: torch.nn.Module | None

    def _loaded(self) -> torch.nn.Module:
        if self.model is None:
            raise ConfigError(f"{type(self).__name__}: configure_model() first (the model is not loaded)")
        return self.model

    def repeated_blocks(self) -> list[torch.nn.Module]:
        """The classes any HF model inside lists as ``_no_split_modules`` (``layers.decoder_layers``)."""
        return decoder_layers(self._loaded())

    def tensor_parallel_plan(self) -> TensorParallelPlan:
        return hf_tensor_parallel_plan(self._loaded())

    def context_parallel_problem(self) -> str | None:
        return hf_context_parallel_problem(self._loaded())

    def expert_parallel_plan(self) -> ExpertParallelPlan:
        return hf_expert_parallel_plan(self._loaded())
