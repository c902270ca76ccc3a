"""Tiny VLMs fine-tuned end to end through ``llm.api.finetune``: LoRA and full SFT overfit four fixed image
chats; LoRA adapts only the language model unless the vision tower trains; full SFT leaves a frozen vision
tower bitwise unchanged and trains it with ``freeze_vision_tower=False``."""

from __future__ import annotations

import fiddle as fdl
import pytest
import torch
from datasets import Dataset
from PIL import ImageOps

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.demo.tiny_vlm import TINY_VLM_FAMILIES
from nemo_automodel.models.hf_vlm import language_model_prefix, vision_towers
from nemo_automodel.peft.targets import resolve_target_modules
from tests.helpers import train_losses

MEGATRON_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
CHATS = [("What digit is this?", "The digit is 0."), ("Which number is written here?", "It is 3."),
         ("What is in the image?", "A black and white image of a number."), ("Describe the picture.", "Yes.")]


def _rows(image) -> list[dict]:
    """Four chats, each with its own image (the digit turned and mirrored)."""
    images = [image, image.rotate(90), ImageOps.mirror(image), image.rotate(180)]
    return [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                          {"role": "assistant", "content": [{"type": "text", "text": a}]}], "images": [im]}
            for (q, a), im in zip(CHATS, images)]


def _finetune(path, rows, tmp_path, peft, steps: int, lr: float, **model_kw):
    """``(model, losses, weights before)``: ``steps`` optimizer steps on the same 4 rows (one micro-batch)."""
    model = llm.HFAutoModelForImageTextToText(str(path), **model_kw)
    before = {n: p.detach().clone() for n, p in model.configure_model().named_parameters()}
    run_dir = llm.api.finetune(
        model=model, peft=peft,
        data=llm.HFImageTextDataModule(Dataset.from_list(rows), seq_length=128, micro_batch_size=4,
                                       global_batch_size=4),
        optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=lr)),
        trainer=nl.Trainer(max_steps=steps, log_every_n_steps=1, enable_progress_bar=False,
                           enable_checkpointing=False),
        log=nl.NeMoLogger(log_dir=str(tmp_path), name="run", tensorboard=False),
    )
    losses = train_losses(run_dir)
    assert len(losses) == steps
    return model, losses, before


def _adapted(module: torch.nn.Module) -> set[str]:
    """Qualified names (without peft's ``base_model.model.`` prefix) of the layers carrying LoRA adapters."""
    names = {n.split(".lora_")[0] for n, _ in module.named_parameters() if ".lora_" in n}
    return {n.removeprefix("base_model.model.") for n in names}


def _in(name: str, prefixes) -> bool:
    return any(name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
@pytest.mark.parametrize("targets", [MEGATRON_TARGETS, ["*_proj"]], ids=["megatron", "star_proj"])
def test_lora_adapts_the_language_model_only_unless_the_vision_tower_trains(family, targets, tiny_vlm_dir):
    path = str(tiny_vlm_dir(family))
    frozen = llm.HFAutoModelForImageTextToText(path)
    base = frozen.configure_model()
    language, towers = language_model_prefix(base), list(vision_towers(base))
    in_vision = [n for n in resolve_target_modules(base, targets) if _in(n, towers)]
    frozen.apply_peft(llm.peft.LoRA(target_modules=targets, dim=4))
    adapted = _adapted(frozen.model)
    assert adapted and all(_in(n, [language]) for n in adapted), sorted(adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} >= {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"}

    trained = llm.HFAutoModelForImageTextToText(path, freeze_vision_tower=False)
    trained.apply_peft(llm.peft.LoRA(target_modules=targets, dim=4))
    assert {n for n in _adapted(trained.model) if _in(n, towers)} == set(in_vision)
    assert _adapted(trained.model) - set(in_vision) == adapted
    if family != "qwen2_vl" or targets == MEGATRON_TARGETS:  # Qwen2-VL's tower names its layers qkv/proj/fc1/fc2
        assert in_vision, "the pattern also matches vision layers, so the scoping above is what kept them out"


def _vision(model) -> list[str]:
    towers = list(vision_towers(model.model))
    return [n for n, _ in model.model.named_parameters() if _in(n, towers)]


def _with_trained_head_scale(path, out):
    """The tiny VLM with its lm_head weights x10. A random head (std 0.02, hidden 64) gives logits within
    about +-1.3 after the final norm, so no adapter on the frozen decoder can bring the loss below ~5 (ln 600
    is 6.4); a trained model's head spans logits of order 10. Only the frozen head changes."""
    from transformers import AutoModelForImageTextToText

    from nemo_automodel.models.processor import load_processor

    model = AutoModelForImageTextToText.from_pretrained(path)
    head = model.get_output_embeddings().weight
    assert head is not model.get_input_embeddings().weight
    with torch.no_grad():
        head.mul_(10)
    model.save_pretrained(out)
    load_processor(str(path)).save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_lora_overfits_four_image_chats(family, tiny_vlm_dir, digit_image, tmp_path):
    path = _with_trained_head_scale(tiny_vlm_dir(family), tmp_path / "base")
    model, losses, before = _finetune(path, _rows(digit_image), tmp_path,
                                      llm.peft.LoRA(target_modules=MEGATRON_TARGETS, dim=8), steps=12, lr=5e-3)
    assert losses[-1] < 0.5 * losses[0], losses
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    base = {n.replace(".base_layer.", "."): p for n, p in model.model.get_base_model().named_parameters()
            if ".lora_" not in n}
    assert base.keys() == before.keys() and all(torch.equal(base[n], before[n]) for n in before)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_full_sft_overfits_and_keeps_the_frozen_vision_tower_bitwise(family, tiny_vlm_dir, digit_image, tmp_path):
    model, losses, before = _finetune(tiny_vlm_dir(family), _rows(digit_image), tmp_path, None, steps=20, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0], losses
    after = dict(model.model.named_parameters())
    vision = _vision(model)
    assert vision and all(torch.equal(after[n], before[n]) for n in vision)
    language = language_model_prefix(model.model)
    changed = [n for n in after if _in(n, [language]) and not torch.equal(after[n], before[n])]
    assert len(changed) == sum(_in(n, [language]) for n in after), "every language-model weight trains"


@pytest.mark.slow
def test_full_sft_with_freeze_vision_tower_false_trains_the_vision_tower(tiny_vlm_dir, digit_image, tmp_path):
    model, losses, before = _finetune(tiny_vlm_dir("llava"), _rows(digit_image), tmp_path, None, steps=3, lr=3e-3,
                                      freeze_vision_tower=False)
    after = dict(model.model.named_parameters())
    vision = _vision(model)
    changed = [n for n in vision if not torch.equal(after[n], before[n])]
    assert vision and len(changed) > 0.9 * len(vision), (len(changed), len(vision))
    assert losses[-1] < losses[0], losses
