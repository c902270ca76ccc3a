"""``HFImageTextDataModule`` batches checked token by token, for every tiny VLM family: the loss trains
exactly each assistant reply and its end-of-turn tokens (derived with the tokenizer alone), never an
image or pad token; labels are the processor's own encoding shifted by one; every processor tensor is
batched; a seq_length that cuts a row's text warns, one that cuts its image tokens is refused."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from PIL import ImageOps

from nemo_automodel.data.image_datamodule import HFImageTextDataModule
from nemo_automodel.demo.tiny_vlm import TINY_VLM_FAMILIES
from nemo_automodel.errors import ConfigError
from nemo_automodel.models.hf_vlm import HFAutoModelForImageTextToText
from nemo_automodel.models.processor import load_processor

# what an assistant turn trains besides the reply, in each family's template: (text between the
# generation prompt and the reply, the end-of-turn string)
TURN = {
    "qwen2_vl": ("", "<|im_end|>\n"),
    "idefics3": (" ", "<end_of_utterance>\n"),
    "llava": (" ", "</s>"),
    "gemma3": ("", "<end_of_turn>\n"),
}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _chats(image, other) -> list[dict]:
    """Three rows of different lengths: one turn; two turns with the image in the first user turn; two images."""
    return [
        {"messages": [{"role": "user", "content": [{"type": "image"}, _text("What digit is this?")]},
                      {"role": "assistant", "content": [_text("7")]}], "images": [image]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, _text("What digit is this?")]},
                      {"role": "assistant", "content": [_text("It is 3.")]},
                      {"role": "user", "content": [_text("Are you sure?")]},
                      {"role": "assistant", "content": [_text("Yes. Thank you. Good night.")]}], "images": [image]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, _text("Count the dots.")]},
                      {"role": "assistant", "content": [_text("I can see a small picture.")]}],
         "images": [image, other]},
    ]


def _inline(row: dict) -> list[dict]:
    """The row's messages with each image inside its part (what ``processor.apply_chat_template`` reads)."""
    images = iter(row["images"])
    return [{"role": m["role"], "content": [{"type": "image", "image": next(images)} if p["type"] == "image" else p
                                            for p in m["content"]]} for m in row["messages"]]


def _without_images(row: dict) -> list[dict]:
    return [{"role": m["role"], "content": [p for p in m["content"] if p["type"] != "image"]} for m in row["messages"]]


def _full_ids(processor, row: dict) -> torch.Tensor:
    """The whole conversation encoded by the processor alone."""
    out = processor.apply_chat_template(_inline(row), tokenize=True, return_dict=True, return_tensors="pt")
    return out["input_ids"][0]


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of ones."""
    runs, start = [], None
    for t, on in enumerate(mask.tolist() + [0.0]):
        if on and start is None:
            start = t
        elif not on and start is not None:
            runs.append((start, t))
            start = None
    return runs


def _datamodule(rows: list[dict], processor, seq_length: int = 256) -> HFImageTextDataModule:
    data = HFImageTextDataModule(Dataset.from_list(rows), seq_length=seq_length, micro_batch_size=len(rows),
                                 shuffle=False)
    data.setup(processor)
    return data


@pytest.fixture(scope="module", params=TINY_VLM_FAMILIES)
def encoded(request, tiny_vlm_dir, digit_image):
    """``(family, processor, rows, batch)``: the three chats of ``_chats`` as one micro-batch."""
    processor = load_processor(str(tiny_vlm_dir(request.param)))
    rows = _chats(digit_image, ImageOps.mirror(digit_image))
    return request.param, processor, rows, next(_datamodule(rows, processor).train_batches())


def _image_only_ids(processor, rows: list[dict]) -> set[int]:
    """Ids that the rows contain only through their images (absent from the same chats without images)."""
    with_images = set(torch.cat([_full_ids(processor, r) for r in rows]).tolist())
    texts = [processor.apply_chat_template(_without_images(r), tokenize=False) for r in rows]
    text_only = {i for t in texts for i in processor.tokenizer(t, add_special_tokens=False)["input_ids"]}
    return with_images - text_only


def test_loss_mask_is_exactly_each_reply_and_its_end_of_turn(encoded):
    family, processor, rows, batch = encoded
    before, end_of_turn = TURN[family]
    mask, labels = batch["loss_mask"], batch["labels"]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for b, row in enumerate(rows):
        replies = [m["content"][0]["text"] for m in row["messages"] if m["role"] == "assistant"]
        expected = [processor.tokenizer(before + reply + end_of_turn, add_special_tokens=False)["input_ids"]
                    for reply in replies]
        trained = [labels[b, s:e].tolist() for s, e in _runs(mask[b])]
        assert trained == expected, (b, [processor.tokenizer.decode(t) for t in trained])


def test_no_image_or_pad_position_trains(encoded):
    _, processor, rows, batch = encoded
    image_ids = _image_only_ids(processor, rows)
    assert {processor.image_token_id, *processor.image_token_ids} <= image_ids  # the derivation found them
    trained = batch["labels"][batch["loss_mask"] == 1]
    assert not set(trained.tolist()) & image_ids

    lengths = batch["num_tokens"].tolist()
    assert len(set(lengths)) == len(rows)  # rows of different lengths, so the shorter ones are padded
    pad = processor.tokenizer.pad_token_id
    for b, n in enumerate(lengths):
        assert not batch["loss_mask"][b, n:].any()
        assert (batch["labels"][b, n:] == pad).all() and batch["attention_mask"][b, n + 1:].sum() == 0
        assert batch["attention_mask"][b, : n + 1].all()


def test_labels_are_the_processor_encoding_shifted_by_one(encoded):
    _, processor, rows, batch = encoded
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == batch["loss_mask"].shape
    assert torch.equal(labels[:, :-1], ids[:, 1:])
    for b, row in enumerate(rows):
        full = _full_ids(processor, row)
        n = int(batch["num_tokens"][b])
        assert n == len(full) - 1
        assert torch.equal(ids[b, :n], full[:-1]) and torch.equal(labels[b, :n], full[1:])


def test_every_processor_tensor_is_batched(encoded):
    family, processor, rows, batch = encoded
    texts = [processor.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    direct = processor(text=texts, images=[r["images"] for r in rows], padding=True, return_tensors="pt",
                       add_special_tokens=False)
    ids = batch["input_ids"]
    bsz, width = ids.shape
    assert set(direct) - {"input_ids"} <= set(batch)
    for key, value in direct.items():
        if key == "input_ids":
            continue
        if tuple(value.shape[:2]) == (bsz, width + 1) and not value.is_floating_point():  # per token
            assert batch[key].shape == ids.shape and torch.equal(batch[key], value[:, :-1]), key
        else:
            assert torch.equal(batch[key], value), key
    n_images = sum(len(r["images"]) for r in rows)
    pixels = batch["pixel_values"]
    if family == "qwen2_vl":  # flattened patches, one (t, h, w) grid per image
        assert batch["image_grid_thw"].shape == (n_images, 3)
        assert pixels.shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
    elif family == "idefics3":  # (rows, most images in a row, ...) with a pixel mask of the same layout
        most = max(len(r["images"]) for r in rows)
        assert pixels.shape[:2] == (bsz, most) and batch["pixel_attention_mask"].shape[:2] == (bsz, most)
    else:
        assert pixels.shape[0] == n_images
    image_ids = torch.tensor(processor.image_token_ids)
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in batch:  # marks exactly the image tokens, position by position
            assert torch.equal(batch[key].bool(), torch.isin(ids, image_ids)), key


def test_seq_length_cutting_text_warns_and_cutting_image_tokens_is_refused(encoded, tiny_vlm_dir, caplog):
    family, processor, rows, _ = encoded
    row = rows[1]
    full = _full_ids(processor, row)
    last_image = int(torch.isin(full, torch.tensor(processor.image_token_ids)).nonzero().max())
    cut = last_image + 1  # every image token stays an input, the text after them is cut
    assert cut < len(full) - 1
    with caplog.at_level(logging.WARNING, logger="nemo_automodel.data.image_chat"):
        batch = next(_datamodule([row], processor, seq_length=cut).train_batches())
    assert f"truncated at seq_length={cut}" in caplog.text
    assert batch["input_ids"].shape == (1, cut) and int(batch["num_tokens"][0]) == cut
    assert torch.equal(batch["input_ids"][0], full[:cut]) and torch.equal(batch["labels"][0], full[1: cut + 1])
    model = HFAutoModelForImageTextToText(str(tiny_vlm_dir(family)))
    with torch.no_grad():  # the cut batch still runs: the model finds a feature for every image token
        assert torch.isfinite(model.forward(model.configure_model(), batch)).all()

    with pytest.raises(ConfigError, match=f"seq_length={last_image}") as err:  # the last image token is cut
        next(_datamodule([row], processor, seq_length=last_image).train_batches())
    assert "\n" not in str(err.value)
