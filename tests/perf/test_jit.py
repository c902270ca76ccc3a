"""JitConfig / JitTransform: module selection, and compile on/off give the same loss trajectory.

Tolerance: inductor reorders float sums, so per-step losses may differ by rounding; we require
1e-3 relative over 4 steps (observed: ~1e-6).
"""

from __future__ import annotations

import fiddle as fdl
import pytest
import torch

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.errors import ConfigError
from nemo_automodel.models.layers import decoder_layers
from nemo_automodel.trainer.jit import JitConfig, JitTransform, jit_compile, select_modules
from tests.helpers import chat_dataset, train_losses


def _tiny():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def test_selection():
    model = _tiny()
    blocks = decoder_layers(model)  # what HFAutoModelForCausalLM.repeated_blocks names
    assert [n for n, _ in select_modules(model, blocks=blocks)] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert select_modules(model, ".") == [("", model)]
    assert [n for n, _ in select_modules(model, "*.mlp")] == [f"model.layers.{i}.mlp" for i in range(3)]
    assert [n for n, _ in select_modules(model, "model*")] == ["model"]  # outermost match only
    with pytest.raises(ConfigError):
        jit_compile(model, JitConfig(use_torch=True, module_selector="nothing*"))
    with pytest.raises(ConfigError, match="names no repeated blocks"):  # the default asks the model, not a guess
        jit_compile(model, JitConfig(use_torch=True), blocks=[])
    with pytest.raises(ConfigError):
        JitConfig(use_thunder=True)
    assert jit_compile(model, JitConfig(use_torch=False)) == []


def test_compile_keeps_state_dict_keys():
    model = _tiny()
    keys = list(model.state_dict())
    assert jit_compile(model, JitConfig(use_torch=True), decoder_layers(model)) == [f"model.layers.{i}" for i in range(3)]
    assert list(model.state_dict()) == keys


@pytest.mark.slow
# LoRA is compiled with activation checkpointing on (the harder case: the compiled blocks recompute in backward);
# a plain LoRA run added 53 s of compiling to the suite and no path these two do not take
@pytest.mark.parametrize(("peft", "checkpointing"), [(False, False), (True, True)],
                         ids=["full-sft", "lora-activation-checkpointing"])
def test_jit_on_off_same_losses(peft, checkpointing, tiny_llama, tmp_path):
    """The compiled run (with activation checkpointing where asked) against a plain eager run."""
    torch._dynamo.reset()
    runs = []
    for jit in (False, True):
        cb = JitTransform(JitConfig(use_torch=True)) if jit else None
        run_dir = llm.api.finetune(
            model=llm.HFAutoModelForCausalLM(str(tiny_llama), activation_checkpointing=jit and checkpointing),
            peft=llm.peft.LoRA(target_modules=["*_proj"], dim=8) if peft else None,
            data=llm.HFDatasetDataModule(chat_dataset(), formatting="chat", seq_length=64, micro_batch_size=4,
                                         global_batch_size=8),
            optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=1e-3)),
            trainer=nl.Trainer(max_steps=4, log_every_n_steps=1, enable_progress_bar=False,
                               enable_checkpointing=False, callbacks=[cb] if cb else []),
            log=nl.NeMoLogger(log_dir=str(tmp_path / str(jit)), name="run", tensorboard=False))
        runs.append(train_losses(run_dir))
        if cb:
            assert cb.compiled and all(".layers." in n for n in cb.compiled)
    plain, jit = runs
    assert len(jit) == 4 and max(abs(a - b) / a for a, b in zip(plain, jit)) < 1e-3, (plain, jit)
