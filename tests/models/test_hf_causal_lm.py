"""`HFAutoModelForCausalLM`: lazy loading by path, random init, dtype, attention fallback, tokenizer."""

from __future__ import annotations

import logging

import pytest
import torch

from nemo_automodel import llm
from nemo_automodel.errors import ConfigError


def test_loads_lazily_and_by_path(tiny_llama):
    model = llm.HFAutoModelForCausalLM(tiny_llama, torch_dtype="bfloat16")
    assert model.model is None and model._tokenizer is None  # nothing read at construction
    hf = model.configure_model()
    assert hf.dtype == torch.bfloat16 and hf.config.use_cache is False
    assert model.configure_model() is hf  # idempotent


def test_random_init_differs_from_pretrained(tiny_llama):
    pretrained = llm.HFAutoModelForCausalLM(str(tiny_llama)).configure_model()
    torch.manual_seed(123)
    scratch = llm.HFAutoModelForCausalLM(str(tiny_llama), load_pretrained_weights=False).configure_model()
    assert type(scratch) is type(pretrained)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(scratch.state_dict()[w], pretrained.state_dict()[w])


def test_attention_falls_back_when_unavailable(tiny_llama, caplog):
    # flash-attention needs CUDA and the flash_attn package: on this machine it must fall back.
    model = llm.HFAutoModelForCausalLM(str(tiny_llama), attn_implementation="flash_attention_2")
    with caplog.at_level(logging.WARNING):
        hf = model.configure_model()
    assert hf.config._attn_implementation in ("sdpa", "eager")
    assert "flash_attention_2" in caplog.text


def test_tokenizer_has_pad_and_nemo_wrapper(tiny_llama):
    model = llm.HFAutoModelForCausalLM(str(tiny_llama))
    assert model.tokenizer.pad_token_id is not None and model.tokenizer.chat_template
    wrapper = llm.HFAutoModelForCausalLM.configure_tokenizer(str(tiny_llama))
    ids = wrapper.text_to_ids("hello world")
    assert wrapper.ids_to_text(ids) == "hello world" and wrapper.eos_id == model.tokenizer.eos_token_id


def test_missing_local_folder_is_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a model folder") as err:
        llm.HFAutoModelForCausalLM(str(tmp_path / "missing")).configure_model()
    assert "\n" not in str(err.value)
