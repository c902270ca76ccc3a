"""Fixtures for the Megatron-Core backend tests: tiny Llama/Qwen2/Mistral folders and token data.

The models differ from the session's tiny ones where the mapping has cases to cover: Llama with
Llama-3 RoPE scaling and tied embeddings, Qwen2 with qkv bias and untied output, Mistral with a
sliding window shorter than the test sequences. Norm weights and biases are perturbed so a
swapped or dropped tensor shows in the logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import require_module, write_token_rows

require_module("megatron.core", "the megatron extra is not installed")

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def hf_config(arch: str):
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE,
                                        max_position_embeddings=16384, **SMALL)
    if arch == "qwen2":
        return transformers.Qwen2Config(tie_word_embeddings=False, max_position_embeddings=512, **SMALL)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=6, max_position_embeddings=512, **SMALL)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def megatron_model_factory(tmp_path_factory, tokenizer):
    """``make(arch) -> Path``: a saved tiny random HF model (with a real tokenizer), cached per session."""
    import transformers

    cache: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in cache:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(hf_config(arch))
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "norm" in name or name.endswith("bias"):
                        param.add_(0.1 * torch.randn_like(param))
            out = tmp_path_factory.mktemp(f"mg-{arch}")
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            cache[arch] = out
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def token_file(tmp_path_factory) -> Path:
    """24 pre-tokenized rows of 12-40 tokens (learnable arithmetic sequences of ids in 3..499)."""
    return write_token_rows(tmp_path_factory.mktemp("mg-tokens") / "train.jsonl", 24)


@pytest.fixture
def megatron_strategy(request):
    """A set-up single-process MegatronStrategy (TP=1), torn down afterwards; on the CPU unless a test
    passes another accelerator (``parametrize("megatron_strategy", ["gpu"], indirect=True)``)."""
    from nemo_automodel.megatron import MegatronStrategy

    strategy = MegatronStrategy()
    strategy.setup(getattr(request, "param", "cpu"))
    yield strategy
    strategy.teardown()
