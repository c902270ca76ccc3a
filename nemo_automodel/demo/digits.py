"""Real images offline: scikit-learn's handwritten digits as "What digit is this?" image chats.

scikit-learn's wheel ships ``datasets/data/digits.csv.gz``: 1,797 real 8x8 handwritten digits (UCI optical
recognition set, ~180 per class). It is read with numpy alone (importing sklearn would pull scipy), so
the wheel is installed ``--no-deps`` by ``make venv``. The split is fixed: a seeded permutation, the last
``TEST_ROWS`` rows held out.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nemo_automodel.demo.assets import build_once, cache_root, wheel_file

if TYPE_CHECKING:
    import datasets

PROMPT = "What digit is this?"
TEST_ROWS = 180
IMAGE_SIZE = 32


def digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: uint8 [N, 8, 8] (0 = background, 255 = ink) and int64 [N]."""
    path = wheel_file("sklearn", "datasets/data/digits.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    pixels = table[:, :64].reshape(-1, 8, 8) * (255.0 / 16.0)
    return pixels.round().astype(np.uint8), table[:, 64].astype(np.int64)


def digit_image(pixels: np.ndarray, size: int = IMAGE_SIZE) -> Any:
    """An 8x8 digit as a ``size`` px RGB PIL image (dark ink on white, nearest-neighbour upscaling)."""
    from PIL import Image

    return Image.fromarray(255 - pixels, mode="L").resize((size, size), Image.Resampling.NEAREST).convert("RGB")


def digit_chat(label: int) -> list[dict[str, Any]]:
    """The conversation of one row: an image part (filled from the ``images`` column) and the answer."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": str(label)}]}]


def digit_chats(split: str = "train", limit: int | None = None, size: int = IMAGE_SIZE) -> datasets.Dataset:
    """A ``datasets.Dataset`` of image chats (``messages``, ``images``, ``label``): ``"train"`` (1,617 rows)
    or ``"test"`` (the 180 held-out rows)."""
    import datasets

    if split not in ("train", "test"):
        from nemo_automodel.errors import bad_value

        raise bad_value("split", split, "'train' or 'test'")
    images, labels = digit_arrays()
    order = np.random.default_rng(0).permutation(len(labels))
    rows = order[:-TEST_ROWS] if split == "train" else order[-TEST_ROWS:]
    rows = rows[:limit] if limit else rows
    return datasets.Dataset.from_dict({
        "messages": [digit_chat(int(labels[i])) for i in rows],
        "images": [[digit_image(images[i], size)] for i in rows],
        "label": [int(labels[i]) for i in rows],
    }, features=datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": [datasets.Image()],
        "label": datasets.Value("int64"),
    }))


def ascii_digit(pixels: np.ndarray) -> str:
    """An 8x8 digit drawn with characters (for printing a sample)."""
    shades = " .:*#"
    return "\n".join("".join(shades[int(v) * (len(shades) - 1) // 255] * 2 for v in row) for row in pixels)


def greedy_digit_accuracy(model: Any, processor: Any, dataset: datasets.Dataset, batch_size: int = 30) -> float:
    """The share of rows whose greedy first answer token is the right digit's (one forward per batch).

    The prompt is the row's user turn with the generation prompt; the expected token is the first token of
    the assistant reply as the chat template renders it (e.g. ``" 7"`` or ``"7"``), found by encoding the
    full conversation, so the check is the first step of greedy generation for any family."""
    import torch

    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "right"
    hits = 0
    for lo in range(0, len(dataset), batch_size):
        rows = dataset[lo: lo + batch_size]
        prompts = [processor.apply_chat_template(m[:1], add_generation_prompt=True) for m in rows["messages"]]
        fulls = [processor.apply_chat_template(m) for m in rows["messages"]]
        enc = processor(text=prompts, images=rows["images"], padding=True, return_tensors="pt",
                        add_special_tokens=False)
        starts = enc["attention_mask"].sum(1)
        want = processor(text=fulls, images=rows["images"], padding=True, return_tensors="pt",
                         add_special_tokens=False)["input_ids"].gather(1, starts[:, None])[:, 0]
        with torch.no_grad():
            logits = model.eval()(**enc, use_cache=False).logits
        got = logits.gather(1, (starts - 1)[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0].argmax(-1)
        hits += int((got == want).sum())
    return hits / len(dataset)


def base_model_dir(family: str = "idefics3", seed: int = 0, cache_dir: str | None = None) -> Path:
    """A tiny random ``family`` VLM with its processor (``demo/tiny_vlm.py``), built once into the cache.

    No pretrained vision-language model ships inside a PyPI wheel, so the digits recipe starts from random
    weights: what it shows is that the whole path (images, masking, training the vision tower, saving,
    reloading) learns to read digits from nothing."""
    from nemo_automodel.demo.tiny_vlm import build_tiny_vlm

    return build_once(cache_root(cache_dir) / f"tiny-vlm-{family}-{seed}",
                      lambda out: build_tiny_vlm(family, out, seed=seed))
