"""The router load-balancing loss of mixture-of-experts models (Mixtral, Qwen-MoE, ...), added to our loss.

transformers adds ``router_aux_loss_coef * aux_loss`` to its own ``loss`` when the model runs with
``output_router_logits``; our loss is computed from the logits (or the chunked head), so it asks for the router
logits and adds the same term with the family's own ``load_balancing_loss_func``. The mask is the batch's real
tokens (``num_tokens``; padding routes nowhere), so packed and padded micro-batches count what the model saw.
The term joins our summed loss weighted by the micro-batch's loss tokens: for one micro-batch the step's loss is
transformers' ``loss`` exactly, and under gradient accumulation each micro-batch's term counts by its tokens.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from nemo_automodel.errors import bad_value


def has_router(config: Any) -> bool:
    """Whether the family computes a router load-balancing loss (its config carries the switch for it)."""
    return hasattr(config, "output_router_logits") and hasattr(config, "router_aux_loss_coef")


def router_aux_coef(config: Any, asked: float | None) -> float:
    """The coefficient to train with: ``asked`` (0 switches the term off), else the config's own for a family with
    a router, else 0. A coefficient for a model without one is refused in one line."""
    if asked is None:
        return float(config.router_aux_loss_coef or 0.0) if has_router(config) else 0.0
    if asked < 0:
        raise bad_value("router_aux_loss_coef", asked, "use a number >= 0 (0 switches the load-balancing loss off)")
    if asked and not has_router(config):
        raise bad_value("router_aux_loss_coef", asked, f"{type(config).__name__} has no router load-balancing "
                        "loss; leave it None")
    return float(asked)


def router_aux_loss(hf_model: torch.nn.Module, router_logits: tuple[torch.Tensor, ...],
                    batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The family's load-balancing loss of one micro-batch (no coefficient), over its real tokens."""
    # the family's module: FSDP2 swaps the class for a subclass of its own (FSDPQwen3MoeForCausalLM)
    balancing = next((f for cls in type(hf_model).__mro__
                      if (f := getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None))), None)
    if balancing is None:
        raise bad_value("router_aux_loss_coef", "> 0", f"{type(hf_model).__name__} ships no load-balancing loss; "
                        "set router_aux_loss_coef=0")
    ids = batch["input_ids"]
    mask = None
    if "num_tokens" in batch:
        mask = (torch.arange(ids.shape[1], device=ids.device) < batch["num_tokens"].to(ids.device)[:, None]).long()
    return balancing(router_logits, hf_model.num_experts, hf_model.num_experts_per_tok, mask)
