"""Builders shared by the GGUF tests: tiny random Llama/Qwen2/Mistral folders with SmolLM2's tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
ARCHS = ["llama", "qwen2", "mistral"]
TEXTS = ["The capital of France is Paris.", "Numbers: 12345 and 3.14159!", "  two  spaces,\ttab\n\n\nnewlines",
         "ünïcödé — 日本語 😀", "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>", "def f(x):\n    return x ** 2"]
CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which animal barks?"},
     {"role": "assistant", "content": "A dog."}, {"role": "user", "content": "And bees?"}],
    [{"role": "user", "content": "What is the capital of France?"}],  # SmolLM2 adds its default system prompt
]
# Llama 3.1's rope scaling, with an original context short enough that it changes the tiny model's frequencies
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# llama.cpp's names for the pre-tokenizers the tiny models carry
PRE = {"llama": "gpt-2", "mistral": "gpt-2", "qwen2": "qwen2"}


def qwen2_style(tokenizer_dir: Path, out: Path) -> Path:
    """SmolLM2's vocabulary with Qwen2's pre-tokenizer and normalizer, as real Qwen2 tokenizers have."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import AutoTokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    tok.save_pretrained(out)
    return out


def tiny_config(arch: str, vocab: int):
    import transformers

    if arch == "llama":  # tied embeddings, GQA (k rows permuted with 2 kv heads)
        return transformers.LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, rope_theta=50000.0, **DIMS)
    if arch == "llama3":  # Llama 3.1+ rope scaling: travels as llama.cpp's rope_freqs tensor
        return transformers.LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE,
                                        **DIMS)
    if arch == "qwen2":  # untied lm_head, q/k/v biases, llama.cpp's half-split rope (no permutation)
        return transformers.Qwen2Config(vocab_size=vocab, tie_word_embeddings=False, rms_norm_eps=1e-5, **DIMS)
    # head_dim 32 != 64/4: llama.cpp reads it from attention.key_length
    return transformers.MistralConfig(vocab_size=vocab, sliding_window=None, head_dim=32, **DIMS)


def build_tiny(arch: str, out: Path, tokenizer_dir: Path) -> Path:
    """A tiny random model in ``out`` whose every weight (norms and biases too) is random, seed 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen2_style(tokenizer_dir, out) if arch == "qwen2" else tokenizer_dir)
    cfg = tiny_config(arch, len(tok))
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def rounded(weight: torch.Tensor, outtype: str) -> torch.Tensor:
    """What an f32/f16/bf16 GGUF holds for ``weight``: matrices rounded (nearest even), vectors kept f32."""
    if weight.dim() < 2 or outtype == "f32":
        return weight
    return weight.to(torch.bfloat16 if outtype == "bf16" else torch.float16).float()
