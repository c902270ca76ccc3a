"""Builders shared by the GGUF tests: tiny random models of the families llama.cpp's converter writes.

Tokenizers: Llama/SmolLM2, Qwen3-MoE and Mistral carry SmolLM2's real byte-level BPE, whose pre-tokenizer llama.cpp's
converter knows ("smollm"; it recognizes a BPE by hashing how it splits a probe text). Gemma2, Gemma3, Phi-3, Qwen3
and Qwen2 carry a tiny sentencepiece BPE with byte fallback trained here, as Gemma and Phi-3 ship (their converters
read ``tokenizer.model``; the Qwen ones try it first). That keeps transformers' GGUF reader fast (it parses SmolLM2's
49k tokens and merges in ~6 s per reload), and Qwen2 needs it: transformers 5 gives a ``qwen2`` folder its
``Qwen2Tokenizer``, which re-splits SmolLM2's vocabulary with Qwen2's regex, a hash llama.cpp does not know.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from tests.helpers import QA

DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
# the families `make test` converts and reloads in transformers, and llama.cpp checks in f16
FAMILIES = ["llama", "gemma2", "gemma3", "phi3", "qwen3", "qwen3_moe"]
# families llama.cpp also checks in f32 (the GGUF families of the hand converter this one replaced)
MORE_FAMILIES = ["qwen2", "mistral", "llama3"]
SENTENCEPIECE = {"gemma2", "gemma3", "phi3", "qwen3", "qwen2"}
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
SP_VOCAB = 384
# sentencepiece layouts: special pieces (id, text), extra symbols, transformers' tokenizer class. Phi-3 keeps Llama 2's
# (llama.cpp looks up <unk>, <s>, </s> and <|endoftext|> by text in any model named phi3)
SP_LAYOUTS = {
    "gemma": ({"pad": (0, "<pad>"), "eos": (1, "<eos>"), "bos": (2, "<bos>"), "unk": (3, "<unk>")},
              ["<start_of_turn>", "<end_of_turn>"], "GemmaTokenizer"),
    "llama": ({"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (-1, "<pad>")},
              ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"], "LlamaTokenizer"),
}


def sentencepiece_tokenizer(out: Path, layout: str = "gemma") -> Path:
    """A 384-piece sentencepiece BPE (byte fallback, split digits, the layout's special pieces and symbols) trained
    on the QA chats, saved as ``tokenizer.model`` plus transformers' files. Deterministic."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    specials, symbols, tokenizer_class = SP_LAYOUTS[layout]
    text = [f"{q} {a}" for q, a in QA] * 20 + ["def f(x):\n    return x ** 2", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=SP_VOCAB, model_type="bpe", byte_fallback=True,
        split_digits=True, character_coverage=1.0, num_threads=1, minloglevel=2, user_defined_symbols=symbols,
        **{f"{k}_id": i for k, (i, _) in specials.items()}, **{f"{k}_piece": p for k, (_, p) in specials.items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": tokenizer_class}
    if specials["pad"][0] < 0:  # Phi-3 pads with <|endoftext|> (the GGUF says so; transformers' reader needs it)
        config["pad_token"] = symbols[0]
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(out).save_pretrained(out)
    return out


def tiny_config(family: str, vocab: int):
    """Each family's tiny config. Where transformers' GGUF reader does not read a field back (Qwen3's head_dim,
    Qwen3-MoE's expert width, Gemma's query scale), the tiny model keeps the value the reader assumes, which is
    also the real models' value."""
    import transformers

    if family == "llama":  # tied embeddings, GQA
        return transformers.LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, rope_theta=50000.0, **DIMS)
    if family == "llama3":  # Llama 3.1+ rope scaling: llama.cpp's rope_freqs tensor
        return transformers.LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE,
                                        **DIMS)
    if family == "qwen2":  # untied lm_head, q/k/v biases
        return transformers.Qwen2Config(vocab_size=vocab, tie_word_embeddings=False, rms_norm_eps=1e-5, **DIMS)
    if family == "mistral":  # head_dim 32 != 64/4
        return transformers.MistralConfig(vocab_size=vocab, sliding_window=None, head_dim=32, **DIMS)
    if family == "gemma2":  # logit soft-capping, a sliding window shorter than the prompts on every other layer
        return transformers.Gemma2Config(vocab_size=vocab, **DIMS, head_dim=256, query_pre_attn_scalar=256,
                                         sliding_window=8)
    if family == "gemma3":  # 6 layers: 5 sliding (local rope base) then 1 global, q/k norms
        return transformers.Gemma3TextConfig(vocab_size=vocab, **{**DIMS, "num_hidden_layers": 6}, head_dim=256,
                                             query_pre_attn_scalar=256, sliding_window=8)
    if family == "phi3":  # fused qkv and gate_up projections
        return transformers.Phi3Config(vocab_size=vocab, **DIMS)
    if family == "qwen3":  # q/k norms
        return transformers.Qwen3Config(vocab_size=vocab, **DIMS, head_dim=128, tie_word_embeddings=False)
    if family == "qwen3_moe":  # 4 routed experts, top 2 (fused 3-D expert weights in transformers 5)
        return transformers.Qwen3MoeConfig(vocab_size=vocab, **DIMS, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=768, norm_topk_prob=True)
    raise ValueError(family)


def build_tiny(family: str, out: Path, tokenizer_dir: Path) -> Path:
    """A tiny random model of ``family`` in ``out`` whose every weight (norms and biases too) is random, seed 0;
    ``tokenizer_dir`` is SmolLM2's tokenizer (used by the byte-level BPE families)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if family in SENTENCEPIECE:
        tok = AutoTokenizer.from_pretrained(sentencepiece_tokenizer(out, "llama" if family == "phi3" else "gemma"))
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.save_pretrained(out)
    cfg = tiny_config(family, len(tok))
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    norm_offset = 0.0 if family.startswith("gemma") else 1.0  # Gemma's norms scale by 1 + w: w near 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(norm_offset + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def prompt_ids(family: str, count: int = 4, length: int = 12) -> list[list[int]]:
    """Fixed token-id prompts (random ids of ordinary tokens, seed per prompt): what every engine is given, so
    a comparison does not depend on tokenizer round trips."""
    low, high = (270, SP_VOCAB) if family in SENTENCEPIECE else (100, 49152)  # past the specials and byte pieces
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(low, high, (length + 2 * i,), generator=gen).tolist() for i in range(count)]


def rounded(weight: torch.Tensor, outtype: str) -> torch.Tensor:
    """What an f32/f16/bf16 GGUF holds for ``weight``: matrices rounded (nearest even), vectors kept f32."""
    if weight.dim() < 2 or outtype == "f32":
        return weight
    return weight.to(torch.bfloat16 if outtype == "bf16" else torch.float16).float()
