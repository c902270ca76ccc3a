"""The tiny VLM families reload through transformers + ``load_processor``, are deterministic, render
their chat template with the right number of image tokens, and train with LoRA on the text model."""

from __future__ import annotations

import pytest
import torch

from nemo_automodel.demo.tiny_vlm import TINY_VLM_FAMILIES, build_tiny_vlm
from nemo_automodel.errors import ConfigError
from nemo_automodel.models.processor import has_chat_template, load_processor

# image tokens per image, and the batch keys beyond input_ids/attention_mask/pixel_values
EXPECTED = {
    "qwen2_vl": (4, {"image_grid_thw", "mm_token_type_ids"}),
    "idefics3": (16, {"pixel_attention_mask"}),
    "llava": (16, set()),
    "gemma3": (16, {"token_type_ids"}),
}
LM_PROJECTIONS = r".*\.(language_model|text_model)\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"

FAMILIES = pytest.mark.parametrize("family", TINY_VLM_FAMILIES)


def _load(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path), load_processor(str(path))


def _batch(processor, image, model):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What digit is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "7"}]},
    ]
    batch = dict(processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt"))
    labels = batch["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    return batch, labels


def _logits(path, image) -> torch.Tensor:
    model, processor = _load(path)
    batch, _ = _batch(processor, image, model)
    with torch.no_grad():
        return model(**batch).logits


@FAMILIES
def test_reloads_with_processor_and_chat_template(family, tiny_vlm_dir):
    model, processor = _load(tiny_vlm_dir(family))
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.head_dim) == (64, 2, 32)
    assert model.config.image_token_id < len(processor.tokenizer) == text.vocab_size <= 1000
    assert has_chat_template(processor) and processor.tokenizer.pad_token is not None


@FAMILIES
def test_same_seed_same_logits_other_seed_other_logits(family, tiny_vlm_dir, digit_image, tmp_path):
    first = _logits(tiny_vlm_dir(family), digit_image)
    again = _logits(build_tiny_vlm(family, tmp_path / "again", seed=0), digit_image)
    other = _logits(tiny_vlm_dir(family, seed=1), digit_image)
    assert torch.equal(first, again)
    assert first.shape == other.shape and not torch.allclose(first, other)


@FAMILIES
def test_chat_template_expands_the_image_and_backpropagates(family, tiny_vlm_dir, digit_image):
    model, processor = _load(tiny_vlm_dir(family))
    batch, labels = _batch(processor, digit_image, model)
    tokens, extra = EXPECTED[family]
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"} | extra
    assert (batch["input_ids"] == model.config.image_token_id).sum().item() == tokens
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".layers.0." in n and "language" in n)


@FAMILIES
def test_lora_on_the_language_model_lowers_the_loss(family, tiny_vlm_dir, digit_image):
    from peft import LoraConfig, get_peft_model

    model, processor = _load(tiny_vlm_dir(family))
    batch, labels = _batch(processor, digit_image, model)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LM_PROJECTIONS))
    adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if "lora_" in n}
    assert len(adapted) == 2 * 7 and all("vision" not in n and "visual" not in n for n in adapted)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("kind", ["missing", "tokenizer_only", "config_only"])
def test_load_processor_errors_are_one_line_naming_the_folder(kind, tiny_vlm_dir, tmp_path):
    folder = tmp_path / kind
    if kind == "tokenizer_only":
        load_processor(str(tiny_vlm_dir("llava"))).tokenizer.save_pretrained(folder)
    elif kind == "config_only":  # a Qwen2-VL config: the fallback without a video processor fails too
        folder.mkdir()
        (folder / "config.json").write_text((tiny_vlm_dir("qwen2_vl") / "config.json").read_text())
    with pytest.raises(ConfigError) as err:
        load_processor(str(folder))
    message = str(err.value)
    assert "\n" not in message and repr(str(folder)) in message and "could not be loaded" in message


def test_has_chat_template_refuses_a_processor_without_one(tiny_vlm_dir):
    processor = load_processor(str(tiny_vlm_dir("llava")))
    assert has_chat_template(processor)
    processor.chat_template = processor.tokenizer.chat_template = None
    assert not has_chat_template(processor)


def test_unknown_family_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="family='blip'"):
        build_tiny_vlm("blip", tmp_path)
