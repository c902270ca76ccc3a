"""Weight conversion between Hugging Face (Llama/Mistral/Qwen2) and Megatron-Core GPT layouts.

Megatron fuses q, k and v into ``linear_qkv`` grouped per query group (``[q heads of the
group, k, v]`` for each group) and gate/up into ``linear_fc1``. Tensor parallelism splits
``linear_qkv``, ``linear_fc1`` (gate and up separately), the embedding and the output layer by
rows and ``linear_proj``/``linear_fc2`` by columns; norms are replicated. The functions here
work on full (TP=1) state dicts; `shard` and `unshard` move between full and per-rank tensors.
LoRA adapters convert the same way: A is shared by the fused outputs, B splits like the weight.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import torch

from nemo_automodel.megatron.config import GPTConfig

HF_LAYER = "model.layers.{}."
MG_LAYER = "decoder.layers.{}."
# one-to-one renames inside a layer (HF suffix -> Megatron suffix)
LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
# how TP splits each Megatron tensor: dim 0 (rows), dim 1 (columns), gated rows, or replicated (None)
ROW_SPLIT = re.compile(r".*(linear_qkv\.(weight|bias)|word_embeddings\.weight|output_layer\.weight)$")
COL_SPLIT = re.compile(r".*(linear_proj|linear_fc2)\.weight$")
GATED_SPLIT = re.compile(r".*linear_fc1\.weight$")


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    groups, d = cfg.num_query_groups, cfg.head_dim
    per = cfg.num_attention_heads // groups
    rest = q.shape[1:]
    return torch.cat([q.reshape(groups, per * d, *rest), k.reshape(groups, d, *rest),
                      v.reshape(groups, d, *rest)], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of the fused layout: full ``linear_qkv`` rows -> (q, k, v) rows."""
    groups, d = cfg.num_query_groups, cfg.head_dim
    per = cfg.num_attention_heads // groups
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, (per + 2) * d, *rest).split([per * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def iter_hf_to_megatron(hf: Mapping[str, torch.Tensor], cfg: GPTConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Full Megatron GPTModel parameters from HF tensors, one at a time (``hf`` is read lazily)."""
    yield "embedding.word_embeddings.weight", hf["model.embed_tokens.weight"]
    yield "decoder.final_layernorm.weight", hf["model.norm.weight"]
    if not cfg.share_embeddings_and_output_weights:
        yield "output_layer.weight", hf["lm_head.weight"] if "lm_head.weight" in hf else hf["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        src, dst = HF_LAYER.format(i), MG_LAYER.format(i)
        for hf_name, mg_name in LAYER_RENAMES.items():
            yield dst + mg_name, hf[src + hf_name]
        attn = src + "self_attn."
        for kind in ("weight", "bias") if cfg.add_qkv_bias else ("weight",):
            yield dst + f"self_attention.linear_qkv.{kind}", _fuse_qkv(
                hf[attn + f"q_proj.{kind}"], hf[attn + f"k_proj.{kind}"], hf[attn + f"v_proj.{kind}"], cfg)
        yield dst + "mlp.linear_fc1.weight", torch.cat([hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]])


def hf_to_megatron(hf: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A full HF state dict -> a full Megatron GPTModel state dict (parameters only)."""
    return dict(iter_hf_to_megatron(hf, cfg))


def megatron_to_hf(mg: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A full Megatron state dict -> HF names (``lm_head`` omitted when embeddings are tied)."""
    out = {"model.embed_tokens.weight": mg["embedding.word_embeddings.weight"],
           "model.norm.weight": mg["decoder.final_layernorm.weight"]}
    if not cfg.share_embeddings_and_output_weights:
        out["lm_head.weight"] = mg["output_layer.weight"]
    for i in range(cfg.num_layers):
        src, dst = MG_LAYER.format(i), HF_LAYER.format(i)
        for hf_name, mg_name in LAYER_RENAMES.items():
            out[dst + hf_name] = mg[src + mg_name]
        for kind in ("weight", "bias") if cfg.add_qkv_bias else ("weight",):
            q, k, v = split_qkv(mg[src + f"self_attention.linear_qkv.{kind}"], cfg)
            out.update({dst + f"self_attn.q_proj.{kind}": q, dst + f"self_attn.k_proj.{kind}": k,
                        dst + f"self_attn.v_proj.{kind}": v})
        gate, up = mg[src + "mlp.linear_fc1.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
    return {k: v.contiguous() for k, v in out.items()}


# -- tensor parallelism ------------------------------------------------------------------------
def split_dim(name: str) -> int | Literal["gated"] | None:
    """How TP splits the Megatron tensor ``name`` (also LoRA ``lora_B``/``lora_A`` of those layers)."""
    if ".lora_" in name:
        layer, which = name.split(".lora_")[0], name.split(".lora_")[1][0]
        column_parallel = ROW_SPLIT.match(layer + ".weight") or GATED_SPLIT.match(layer + ".weight")
        if column_parallel:  # ColumnParallel base: A replicated, B split by rows (gated like the weight)
            return None if which == "A" else ("gated" if GATED_SPLIT.match(layer + ".weight") else 0)
        return 1 if which == "A" else None  # RowParallel base: A split by columns, B replicated
    if GATED_SPLIT.match(name):
        return "gated"
    if ROW_SPLIT.match(name):
        return 0
    if COL_SPLIT.match(name):
        return 1
    return None


def shard(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This rank's slice of a full Megatron tensor."""
    how = split_dim(name)
    if how is None or tp == 1:
        return full
    if how == "gated":
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    return full.chunk(tp, dim=how)[rank]


def unshard(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from every TP rank's slice (in rank order)."""
    how = split_dim(name)
    if how is None or len(parts) == 1:
        return parts[0]
    if how == "gated":
        halves = [p.chunk(2) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(parts, dim=how)


# -- LoRA adapters -----------------------------------------------------------------------------
LORA_HF_NAMES = {"self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
                 "self_attention.linear_proj": ("self_attn.o_proj",), "mlp.linear_fc2": ("mlp.down_proj",)}
_LORA_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight")


def megatron_lora_to_hf(lora: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Full Megatron LoRA tensors (``decoder.layers.i.<layer>.lora_A.weight``) -> HF module names.

    The fused layers' A is shared by q/k/v (gate/up); B splits like the fused weight, so each
    HF layer's delta ``B_x @ A`` equals its rows of the fused delta exactly.
    """
    out = {}
    for name, tensor in lora.items():
        match = _LORA_KEY.fullmatch(name)
        if match is None:
            raise ValueError(f"{name!r} is not a Megatron LoRA tensor (decoder.layers.<i>.<layer>.lora_<A|B>.weight)")
        layer, inner, which = match.groups()
        targets = LORA_HF_NAMES[inner]
        parts: Sequence[torch.Tensor]
        if which == "A" or len(targets) == 1:
            parts = [tensor.clone() for _ in targets]  # shared A: one copy per HF layer
        elif inner.endswith("linear_qkv"):
            parts = split_qkv(tensor, cfg)
        else:
            parts = tensor.chunk(2)
        for target, part in zip(targets, parts):
            out[f"model.layers.{layer}.{target}.lora_{which}.weight"] = part.contiguous()
    return out


def hf_lora_targets(hf_lora: dict[str, torch.Tensor], num_layers: int) -> list[str]:
    """PEFT ``target_modules`` for converted adapters: module suffixes (``q_proj``) when every layer
    has them, else the full module names."""
    modules = sorted({k.split(".lora_")[0] for k in hf_lora})
    by_suffix: dict[str, set[str]] = {}
    for name in modules:
        by_suffix.setdefault(name.rsplit(".", 1)[1], set()).add(name.split(".")[2])
    if all(len(layers) == num_layers for layers in by_suffix.values()):
        return sorted(by_suffix)
    return modules
