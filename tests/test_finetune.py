"""End to end on tiny random models loaded by path: LoRA and full SFT through `llm.api.finetune`."""

from __future__ import annotations

import functools

import fiddle as fdl
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.trainer.optim import PytorchOptimizerModule
from tests.helpers import chat_dataset, train_losses


def _finetune(model_path, tmp_path, peft, steps=12, lr=1e-2, name="run", **trainer_kw):
    model = llm.HFAutoModelForCausalLM(str(model_path))
    run_dir = llm.api.finetune(
        model=model,
        peft=peft,
        data=llm.HFDatasetDataModule(chat_dataset(), formatting="chat", seq_length=64, micro_batch_size=4,
                                     global_batch_size=8),
        optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=lr)),
        trainer=nl.Trainer(max_steps=steps, log_every_n_steps=1, enable_progress_bar=False,
                           **{"precision": "32", **trainer_kw}),  # exact comparisons: fp32, whatever the CPU
        log=nl.NeMoLogger(log_dir=str(tmp_path), name=name),
    )
    return model, run_dir


def _logits(module, ids):
    with torch.no_grad():
        return module(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_lora_loss_decreases_and_adapter_reloads(arch, tiny_model_factory, tmp_path):
    path = tiny_model_factory(arch)
    model, run_dir = _finetune(path, tmp_path, llm.peft.LoRA(target_modules=["*_proj", "linear_qkv"], dim=8))
    losses = train_losses(run_dir)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses

    adapter = run_dir / "checkpoints" / "last" / "hf_adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    ids = torch.randint(0, 1000, (2, 16))
    trained = _logits(model.model.eval(), ids)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), adapter).eval()
    assert torch.allclose(_logits(reloaded, ids), trained, atol=1e-5, rtol=0)

    merged_dir = llm.peft.merge_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(_logits(merged, ids), trained, atol=1e-4, rtol=0)


def test_full_sft_checkpoint_reloads_equal(tiny_model_factory, tmp_path):
    path = tiny_model_factory("qwen2")
    model, run_dir = _finetune(path, tmp_path, peft=None, steps=8, lr=1e-3)
    losses = train_losses(run_dir)
    assert losses[-1] < losses[0]
    saved = run_dir / "checkpoints" / "last" / "model"
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    ids = torch.randint(0, 1000, (2, 16))
    assert torch.equal(_logits(reloaded, ids), _logits(model.model.eval(), ids))
    assert (saved / "tokenizer_config.json").is_file() and (saved / "chat_template.jinja").is_file()
    for artefact in ("metrics.jsonl", "loss.png"):
        assert (run_dir / artefact).is_file()
    assert any((run_dir / "tensorboard").iterdir())


def test_gradient_accumulation_equals_large_batch(tiny_llama, tmp_path):
    """2 micro-batches of 4 give the same update as 1 batch of 8 (token-weighted loss)."""

    def one_step(micro, name):
        model = llm.HFAutoModelForCausalLM(str(tiny_llama))
        llm.api.finetune(
            model=model, peft=None,
            data=llm.HFDatasetDataModule(chat_dataset(repeat=1), formatting="chat", seq_length=64,
                                         micro_batch_size=micro, global_batch_size=8, shuffle=False),
            # SGD: its update is linear in the gradient, so a wrong loss weighting would show
            optim=PytorchOptimizerModule(functools.partial(torch.optim.SGD, lr=1.0)),
            trainer=nl.Trainer(max_steps=1, enable_progress_bar=False, enable_checkpointing=False, precision="32"),
            log=nl.NeMoLogger(log_dir=str(tmp_path), name=name),
        )
        return {k: v.detach().clone() for k, v in model.model.state_dict().items()}

    big, small = one_step(8, "big"), one_step(4, "small")
    worst = max((big[k] - small[k]).abs().max().item() for k in big)
    assert worst < 1e-6, worst
