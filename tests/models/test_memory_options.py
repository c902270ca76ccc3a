"""Memory options of the HF path: activation checkpointing (parity, really recomputing, bad input) and
``precision="bf16-true"`` (bf16 base, fp32 adapters and optimizer state)."""

from __future__ import annotations

import logging

import fiddle as fdl
import pytest
import torch
import torch.distributed.checkpoint as dcp

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.errors import ConfigError
from nemo_automodel.models import HFAutoModelForCausalLM
from nemo_automodel.models.layers import decoder_layers
from nemo_automodel.peft import LoRA
from tests.helpers import chat_dataset, train_losses

IDS = (torch.arange(3 * 40).reshape(3, 40) * 7) % 900 + 3


def _loss_and_grads(model_dir, *, checkpointing: bool, peft: bool):
    """One forward + backward through ``model.loss``; counts the calls of the decoder layers' submodules."""
    model = HFAutoModelForCausalLM(str(model_dir), activation_checkpointing=checkpointing)
    model.configure_model()
    torch.manual_seed(0)  # the same LoRA init and dropout masks in both runs
    if peft:
        model.apply_peft(LoRA(target_modules=["*_proj"], dim=4, dropout=0.1))  # dropout: the recompute must replay it
    module = model.model.train()
    calls = []
    for layer in decoder_layers(module):  # transformers checkpoints the layer's forward, not its hooks
        for child in layer.children():
            child.register_forward_pre_hook(lambda *_: calls.append(1))
    batch = {"input_ids": IDS, "labels": IDS.roll(-1, 1), "loss_mask": torch.ones_like(IDS)}
    loss = model.loss(module, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return loss.item(), grads, len(calls), len(decoder_layers(module))


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_activation_checkpointing_recomputes_and_matches(tiny_model_factory, arch, peft):
    path = tiny_model_factory(arch)
    loss_off, grads_off, calls_off, layers = _loss_and_grads(path, checkpointing=False, peft=peft)
    loss_on, grads_on, calls_on, _ = _loss_and_grads(path, checkpointing=True, peft=peft)
    assert calls_off >= 2 * layers and calls_on == 2 * calls_off  # each layer's modules ran again in backward
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert grads_on.keys() == grads_off.keys() and grads_on
    worst = max((grads_on[k] - grads_off[k]).abs().max().item() for k in grads_off)
    assert worst < 1e-6, worst


def test_activation_checkpointing_on_a_model_transformers_cannot_checkpoint_is_one_line(tokenizer, tmp_path):
    import transformers

    cfg = transformers.JetMoeConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                    num_key_value_heads=2, kv_channels=16, intermediate_size=64,
                                    num_local_experts=2, num_experts_per_tok=1)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)  # supports_gradient_checkpointing=False
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"^activation_checkpointing=True: JetMoeForCausalLM has no repeated "
                                          r"decoder layers that transformers can checkpoint; set [^\n]*$"):
        HFAutoModelForCausalLM(str(tmp_path), activation_checkpointing=True).configure_model()
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        HFAutoModelForCausalLM(str(tmp_path), activation_checkpointing="yes")


class _Inspect:
    """Trainer callback: the dtypes of the trainable and frozen weights when training starts."""

    def on_train_start(self, trainer, module):
        self.trainable = {p.dtype for p in module.parameters() if p.requires_grad}
        self.frozen = {p.dtype for p in module.parameters() if not p.requires_grad}


def _fit(path, tmp_path, name, peft, precision, steps=10, lr=1e-2):
    inspect = _Inspect()
    run_dir = llm.api.finetune(
        model=llm.HFAutoModelForCausalLM(str(path)), peft=peft,
        data=llm.HFDatasetDataModule(chat_dataset(), formatting="chat", seq_length=64, micro_batch_size=4,
                                     global_batch_size=8),
        optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=lr)),
        trainer=nl.Trainer(max_steps=steps, log_every_n_steps=1, enable_progress_bar=False, precision=precision,
                           callbacks=[inspect]),
        log=nl.NeMoLogger(log_dir=str(tmp_path), name=name))
    return run_dir, inspect


def _saved_state(ckpt):
    meta = dcp.FileSystemReader(str(ckpt / "state")).read_metadata()
    return {k: v.properties.dtype for k, v in meta.state_dict_metadata.items() if hasattr(v, "properties")}


@pytest.mark.slow
def test_bf16_true_keeps_base_bf16_and_adapters_and_adam_fp32(tiny_llama, tmp_path):
    run_dir, seen = _fit(tiny_llama, tmp_path, "lora", LoRA(target_modules=["*_proj"], dim=8), "bf16-true")
    assert seen.frozen == {torch.bfloat16} and seen.trainable == {torch.float32}
    losses = train_losses(run_dir)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    saved = _saved_state(run_dir / "checkpoints" / "last")
    adam = {k: v for k, v in saved.items() if k.startswith("optim.state.") and k.endswith(("exp_avg", "exp_avg_sq"))}
    weights = {k: v for k, v in saved.items() if k.startswith("model.")}
    assert adam and set(adam.values()) == {torch.float32}
    # only the adapters: not the frozen base, nor the output layer tied to the frozen embedding
    assert weights and all("lora_" in k for k in weights) and set(weights.values()) == {torch.float32}


@pytest.mark.slow
def test_bf16_true_full_sft_says_it_has_no_fp32_master_weights(tiny_llama, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run_dir, seen = _fit(tiny_llama, tmp_path, "sft", None, "bf16-true", steps=6, lr=1e-3)
    assert seen.trainable == {torch.bfloat16}
    assert any("no fp32 master copy" in r.getMessage() for r in caplog.records)
    saved = _saved_state(run_dir / "checkpoints" / "last")
    assert {v for k, v in saved.items() if k.endswith("exp_avg")} == {torch.bfloat16}
    losses = train_losses(run_dir)
    assert losses[-1] < losses[0]
