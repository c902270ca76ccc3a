"""The chunked fused linear + cross-entropy equals the plain logits path (loss and gradients).

Tolerances: fp32 relative 1e-5 on the loss and gradients. bf16 autocast: the loss 1e-5 and the
hidden-state gradient 1e-2 relative; the weight gradient 2e-2 of its max (the plain path rounds
one big bf16 matmul over all tokens, the chunked one sums per-chunk bf16 products in fp32).
"""

from __future__ import annotations

import logging

import fiddle as fdl
import pytest
import torch
import torch.nn.functional as F

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.models.chunked_ce import auto_chunk_size, linear_cross_entropy
from nemo_automodel.models.loss import masked_cross_entropy
from tests.helpers import chat_dataset, train_losses


def _case(n=300, h=48, v=1000, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g).requires_grad_()
    w = (0.1 * torch.randn(v, h, generator=g)).requires_grad_()
    b = torch.randn(v, generator=g).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    m = (torch.rand(n, generator=g) > 0.3).float()
    return hid, w, b, y, m


def _run(fn, hid, w, b, bf16):
    for t in (hid, w, b):
        if t is not None:
            t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = fn()
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in (hid, w, b) if t is not None and t.requires_grad]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [64, 7, None])
def test_loss_and_grads_match_plain(bf16, chunk):
    hid, w, b, y, m = _case()
    ref, ref_g = _run(lambda: masked_cross_entropy(F.linear(hid, w, b), y, m), hid, w, b, bf16)
    got, got_g = _run(lambda: linear_cross_entropy(hid, w, y, m, bias=b, chunk_size=chunk), hid, w, b, bf16)
    assert _rel(got, ref) < 1e-5
    tol = (1e-2, 2e-2, 2e-2) if bf16 else (1e-5, 1e-5, 1e-5)
    for name, g, r, t in zip(("hidden", "weight", "bias"), got_g, ref_g, tol):
        assert g.dtype == r.dtype and _rel(g, r) < t, (name, _rel(g, r))


def test_frozen_weight_and_no_grad():
    hid, w, _, y, m = _case(bias=False)
    w.requires_grad_(False)  # LoRA: lm_head frozen, only the hidden states need a gradient
    ref, (ref_h,) = _run(lambda: masked_cross_entropy(hid @ w.t(), y, m), hid, w, None, False)
    got, (got_h,) = _run(lambda: linear_cross_entropy(hid, w, y, m, chunk_size=50), hid, w, None, False)
    assert _rel(got, ref) < 1e-5 and _rel(got_h, ref_h) < 1e-5 and w.grad is None
    with torch.no_grad():
        assert _rel(linear_cross_entropy(hid, w, y, m), ref) < 1e-5


def test_batched_shapes_and_masked_out_of_range_labels():
    hid, w, _, y, m = _case(n=64, bias=False)
    y = torch.where(m > 0, y, torch.full_like(y, -100))  # ignored labels never index the vocab
    ref = masked_cross_entropy((hid @ w.t()).view(4, 16, -1), y.clamp(min=0).view(4, 16), m.view(4, 16))
    got = linear_cross_entropy(hid.view(4, 16, -1), w, y.view(4, 16), m.view(4, 16), chunk_size=10)
    assert _rel(got, ref) < 1e-5


def test_auto_chunk_size():
    assert auto_chunk_size(49152) == 64 and auto_chunk_size(32000) == 128 and auto_chunk_size(10) >= 64


@pytest.mark.slow
@pytest.mark.parametrize("peft", [False, True], ids=["full-sft", "lora"])
def test_training_run_equals_plain(peft, tiny_llama, tmp_path):
    """Six steps with the chunked loss give the plain run's losses (within 1e-4 relative).

    Full SFT on the tied-embedding tiny Llama also checks that the output weight gets gradients."""
    runs = [train_losses(_finetune(tiny_llama, tmp_path / f"{chunked}", peft, chunked)) for chunked in (False, True)]
    plain, chunked = runs
    assert len(plain) == 6 and max(abs(a - b) / a for a, b in zip(plain, chunked)) < 1e-4, (plain, chunked)


def _finetune(path, tmp_path, peft: bool, chunked: bool):
    model = llm.HFAutoModelForCausalLM(str(path), chunked_loss=chunked, loss_chunk_size=16)
    return llm.api.finetune(
        model=model, peft=llm.peft.LoRA(target_modules=["*_proj"], dim=8) if peft else None,
        data=llm.HFDatasetDataModule(chat_dataset(), formatting="chat", seq_length=64, micro_batch_size=4,
                                     global_batch_size=8),
        optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=1e-3)),
        trainer=nl.Trainer(max_steps=6, log_every_n_steps=1, enable_progress_bar=False, enable_checkpointing=False),
        log=nl.NeMoLogger(log_dir=str(tmp_path), name="run", tensorboard=False))


def test_liger_on_cpu_falls_back_to_chunked(tiny_llama, caplog):
    model = llm.HFAutoModelForCausalLM(str(tiny_llama), use_liger_kernel=True)
    with caplog.at_level(logging.WARNING):
        model.configure_model("cpu")
    notices = [r.getMessage() for r in caplog.records if "use_liger_kernel" in r.getMessage()]
    assert len(notices) == 1 and "chunked" in notices[0] and model._loss_impl == "torch"
    ids = torch.randint(0, 1000, (2, 12))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "loss_mask": torch.ones(2, 12)}
    plain = masked_cross_entropy(model.forward(model.model, batch), batch["labels"], batch["loss_mask"])
    assert _rel(model.loss(model.model, batch), plain) < 1e-5


def test_bad_options_fail_in_one_line():
    from nemo_automodel.errors import ConfigError
    from nemo_automodel.models import HFAutoModelForCausalLM

    for kw in ({"chunked_loss": "fast"}, {"loss_chunk_size": 0}):
        with pytest.raises(ConfigError):
            HFAutoModelForCausalLM("x/y", **kw)
