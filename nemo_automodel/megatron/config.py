"""`GPTConfig`: the architecture of a Megatron-Core GPT model, derived from a Hugging Face config.

Llama, Mistral and Qwen2 families map onto Megatron's GPT layer: RMSNorm, SwiGLU, RoPE
(plain, linear or Llama-3 scaling), grouped-query attention, optional qkv bias, tied or
untied embeddings, and (our attention mask) Mistral's sliding window. Anything else fails with
one line naming what Megatron-Core lacks, so a backend swap is refused before a job starts; a
mixture-of-experts or Mamba/hybrid family is named with its experts or SSM mixers (`non_dense_parts`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nemo_automodel.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Megatron's RoPE scaling is Llama 3's with these constants fixed (only the factor is a parameter)
LLAMA3_ROPE_CONSTANTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclasses.dataclass
class GPTConfig:
    """Architecture of a Megatron GPT model (the fields a HF Llama/Mistral/Qwen2 config carries)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    kv_channels: int | None = None
    seq_length: int = 4096
    rotary_base: float = 10000.0
    rope_scaling_factor: float | None = None  # Llama 3 style
    seq_len_interpolation_factor: float | None = None  # linear RoPE scaling
    layernorm_epsilon: float = 1e-5
    share_embeddings_and_output_weights: bool = False
    add_qkv_bias: bool = False
    sliding_window: int | None = None
    init_method_std: float = 0.02
    hf_architecture: str = "LlamaForCausalLM"

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def check_tensor_parallel(self, tp: int) -> None:
        """Fail with one line when ``tp`` does not divide the heads, groups, MLP or vocabulary."""
        sizes = {"num_attention_heads": self.num_attention_heads, "num_query_groups": self.num_query_groups,
                 "ffn_hidden_size": self.ffn_hidden_size, "vocab_size": self.vocab_size}
        bad = {k: v for k, v in sizes.items() if v % tp}
        if bad:
            raise ConfigError(f"tensor_model_parallel_size={tp} does not divide {bad}: pick a size that divides them")

    def transformer_config(self, **parallel: Any):
        """The ``megatron.core`` ``TransformerConfig`` (fusions off: they need CUDA extensions)."""
        import torch.nn.functional as F
        from megatron.core.transformer.transformer_config import TransformerConfig

        return TransformerConfig(
            num_layers=self.num_layers, hidden_size=self.hidden_size, ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads, num_query_groups=self.num_query_groups,
            kv_channels=self.head_dim, normalization="RMSNorm", layernorm_epsilon=self.layernorm_epsilon,
            gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=self.add_qkv_bias,
            hidden_dropout=0.0, attention_dropout=0.0, init_method_std=self.init_method_std,
            attention_softmax_in_fp32=True, bias_activation_fusion=False, masked_softmax_fusion=False,
            persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
            gradient_accumulation_fusion=False, use_cpu_initialization=True, **parallel)

    def gpt_model_kwargs(self) -> dict[str, Any]:
        """Arguments of ``GPTModel`` beyond the transformer config and the layer spec."""
        return dict(vocab_size=self.vocab_size, max_sequence_length=self.seq_length,
                    position_embedding_type="rope", rotary_base=int(self.rotary_base),
                    rope_scaling=self.rope_scaling_factor is not None,
                    rope_scaling_factor=self.rope_scaling_factor or 8.0,
                    seq_len_interpolation_factor=self.seq_len_interpolation_factor,
                    share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
                    parallel_output=True)

    def to_hf(self):
        """A transformers config of the same architecture (for export)."""
        import transformers

        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rotary_base}
        if self.rope_scaling_factor is not None:
            rope = {**rope, "rope_type": "llama3", "factor": self.rope_scaling_factor, **LLAMA3_ROPE_CONSTANTS}
        elif self.seq_len_interpolation_factor is not None:
            rope = {**rope, "rope_type": "linear", "factor": self.seq_len_interpolation_factor}
        family = {"LlamaForCausalLM": transformers.LlamaConfig, "MistralForCausalLM": transformers.MistralConfig,
                  "Qwen2ForCausalLM": transformers.Qwen2Config}[self.hf_architecture]
        extra: dict[str, Any] = {}
        if self.hf_architecture == "MistralForCausalLM":
            extra["sliding_window"] = self.sliding_window
        elif self.hf_architecture == "Qwen2ForCausalLM":
            extra.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window)
        return family(
            architectures=[self.hf_architecture], num_hidden_layers=self.num_layers, hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups, head_dim=self.head_dim, vocab_size=self.vocab_size,
            max_position_embeddings=self.seq_length, rms_norm_eps=self.layernorm_epsilon, hidden_act="silu",
            tie_word_embeddings=self.share_embeddings_and_output_weights, rope_parameters=rope,
            initializer_range=self.init_method_std, **extra)


# layer-type names a Mamba (state-space) mixer layer goes by in transformers configs (5.24 calls them
# "linear_attention"; Jamba "mamba"; Zamba2/FalconH1 "hybrid")
SSM_LAYER_TYPES = ("mamba", "linear_attention", "hybrid")


def _layer_types(hf_config: Any) -> list[str]:
    types = getattr(hf_config, "layers_block_type", None) or getattr(hf_config, "layer_types", None)
    return [str(t) for t in types] if isinstance(types, list | tuple) else []


def non_dense_parts(hf_config: Any) -> list[str]:
    """The Mamba (SSM) mixers and mixture-of-experts layers of a transformers config, described; empty for a
    dense decoder. Our Megatron conversion (``convert.py``) maps attention + one gated MLP per layer only."""
    parts = []
    types = _layer_types(hf_config)
    ssm_state = next((getattr(hf_config, a) for a in ("ssm_state_size", "mamba_d_state", "state_size")
                      if getattr(hf_config, a, None)), None)
    if ssm_state or "mamba" in str(getattr(hf_config, "model_type", "")):
        count = sum(t in SSM_LAYER_TYPES for t in types)
        where = f"{count} of {len(types)} layers" if count else "its layers"
        parts.append(f"Mamba (SSM) mixers ({where}, state size {ssm_state}: conv1d and selective scan)")
    experts = next((getattr(hf_config, a) for a in ("num_experts", "num_local_experts", "n_routed_experts")
                    if getattr(hf_config, a, None)), 0)
    if getattr(hf_config, "hybrid_override_pattern", None) is not None:  # Nemotron-H: only "moe" layers route
        experts = experts if "moe" in types else 0
    if isinstance(experts, int) and experts > 1:
        top = getattr(hf_config, "num_experts_per_tok", None)
        parts.append(f"mixture-of-experts MLPs ({experts} routed experts{f', top-{top}' if top else ''}: router and "
                     "per-expert weights)")
    return parts


def gpt_config_from_hf(hf_config) -> GPTConfig:
    """Map a transformers config onto `GPTConfig`, or raise ConfigError naming what is unsupported."""
    arch = (getattr(hf_config, "architectures", None) or [type(hf_config).__name__.replace("Config", "ForCausalLM")])[0]
    parts = non_dense_parts(hf_config)
    if parts:
        raise ConfigError(f"{arch} ({getattr(hf_config, 'model_type', '?')}) cannot move to Megatron-Core: our "
                          f"conversion maps dense Llama-style decoders only ({', '.join(SUPPORTED_ARCHITECTURES)}) "
                          f"and has no mapping for its {' or its '.join(parts)}; keep it on the AutoModel path")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"{arch} has no Megatron-Core mapping here (supported: {', '.join(SUPPORTED_ARCHITECTURES)}); "
                          "keep it on the AutoModel path")
    missing = []
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        missing.append(f"hidden_act={hf_config.hidden_act!r} (Megatron's gated MLP here is SwiGLU)")
    if getattr(hf_config, "mlp_bias", False):
        missing.append("mlp_bias=True (biases on the MLP only)")
    if getattr(hf_config, "attention_bias", False):
        missing.append("attention_bias=True (bias on o_proj)")
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = interpolation = None
    if rope_type == "llama3":
        off = {k: rope.get(k) for k, v in LLAMA3_ROPE_CONSTANTS.items() if float(rope.get(k, v)) != v}
        if off:
            missing.append(f"Llama-3 RoPE scaling with {off} (Megatron fixes {LLAMA3_ROPE_CONSTANTS})")
        scaling = float(rope["factor"])
    elif rope_type == "linear":
        interpolation = float(rope["factor"])
    elif rope_type != "default":
        missing.append(f"rope_type={rope_type!r} (Megatron-Core has default, linear and llama3)")
    window = getattr(hf_config, "sliding_window", None)
    if arch == "Qwen2ForCausalLM" and not getattr(hf_config, "use_sliding_window", False):
        window = None
    if arch == "LlamaForCausalLM":
        window = None
    if missing:
        raise ConfigError(f"{arch} cannot move to Megatron-Core: unsupported {'; '.join(missing)}")
    heads = hf_config.num_attention_heads
    return GPTConfig(
        num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size, num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        kv_channels=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        vocab_size=hf_config.vocab_size, seq_length=hf_config.max_position_embeddings, rotary_base=float(theta),
        rope_scaling_factor=scaling, seq_len_interpolation_factor=interpolation,
        layernorm_epsilon=hf_config.rms_norm_eps,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        add_qkv_bias=arch == "Qwen2ForCausalLM", sliding_window=window,
        init_method_std=getattr(hf_config, "initializer_range", 0.02), hf_architecture=arch)


# -- NeMo-style named configs (architecture only; weights come from model_id) ---------------------
def Llama32Config1B() -> GPTConfig:  # noqa: N802 - NeMo's spelling
    return GPTConfig(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                     num_query_groups=8, vocab_size=128256, seq_length=131072, rotary_base=500000.0,
                     rope_scaling_factor=32.0, share_embeddings_and_output_weights=True)


def Llama32Config3B() -> GPTConfig:  # noqa: N802
    return dataclasses.replace(Llama32Config1B(), num_layers=28, hidden_size=3072, num_attention_heads=24)


def Qwen25Config500M() -> GPTConfig:  # noqa: N802
    return GPTConfig(num_layers=24, hidden_size=896, ffn_hidden_size=4864, num_attention_heads=14, num_query_groups=2,
                     vocab_size=151936, seq_length=32768, rotary_base=1000000.0, layernorm_epsilon=1e-6,
                     share_embeddings_and_output_weights=True, add_qkv_bias=True, hf_architecture="Qwen2ForCausalLM")


def MistralConfig7B() -> GPTConfig:  # noqa: N802
    return GPTConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                     num_query_groups=8, vocab_size=32768, seq_length=32768, rotary_base=1000000.0,
                     hf_architecture="MistralForCausalLM")
