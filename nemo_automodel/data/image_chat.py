"""Chat rows whose messages hold images -> processor inputs with the loss on assistant tokens only.

A row has a ``messages`` column (role + content: a string or a list of ``{"type": "text", "text": ..}`` and
``{"type": "image", "image": ..}`` parts) and optionally an ``images`` column that fills the image parts
that carry no image, in order. An image is a PIL image, a file path (relative paths resolve against
``image_root``), bytes, an HF ``Image`` feature value (``{"bytes", "path"}``) or an http(s) URL.

A micro-batch is rendered with the processor's chat template and encoded by the processor in one call,
so every tensor it returns (``pixel_values``, ``image_grid_thw``, ``pixel_attention_mask``,
``token_type_ids``, ...) is batched the way the model family expects. The loss mask marks each assistant
turn: its tokens run from the end of the prompt rendered with ``add_generation_prompt=True`` to the end of
the conversation rendered up to and including the turn (so the template's end-of-turn tokens train too).
Both boundaries are measured by encoding those prefixes with their images, and each prefix must encode
as the start of the whole conversation. Image tokens and padding never train: images may sit only in
user and system turns, and pads are past each row's length.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nemo_automodel.errors import ConfigError, first_line

log = logging.getLogger(__name__)
Message = dict[str, Any]
_IMAGE_KEYS = ("image", "path", "url")


def load_image(value: Any, root: Path | None, where: str) -> Any:
    """A PIL RGB image from any supported image value; one ConfigError line naming ``where`` otherwise."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Mapping):  # an HF Image feature value that was not decoded
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, os.PathLike)) and str(value).startswith(("http://", "https://")):
            from transformers.image_utils import load_image as fetch

            image = fetch(str(value))
        elif isinstance(value, (str, os.PathLike)):
            path = Path(value).expanduser()
            path = path if path.is_absolute() or root is None else root / path
            if not path.is_file():
                raise ConfigError(f"{where}: image file {str(path)!r} does not exist: check the path or image_root")
            image = Image.open(path)
        else:
            raise ConfigError(f"{where}: an image must be a PIL image, a file path, bytes or a URL, "
                              f"got {type(value).__name__}")
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: the image cannot be read ({first_line(err)}): fix or remove it") from err
    return image.convert("RGB")


def _parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, Sequence):
        raise ConfigError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") not in ("text", "image"):
            raise ConfigError(f"{where}: each content part must be {{'type': 'text'|'image', ...}}, got {part!r}")
        parts.append({k: v for k, v in part.items() if v is not None})  # datasets fills absent keys with None
    return parts


def split_row(row: Mapping[str, Any], index: int, messages_column: str = "messages",
              images_column: str = "images", root: Path | None = None) -> tuple[list[Message], list[Any]]:
    """``(messages, images)``: messages with bare ``{"type": "image"}`` placeholders (what chat templates
    render) and the PIL images in placeholder order. Raises one line for a row that cannot train."""
    messages = row.get(messages_column)
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ConfigError(f"row {index}: {messages_column!r} must be a non-empty list of messages, got {messages!r}")
    pool = list(row.get(images_column) or [])
    out, images, n_parts = [], [], 0
    for m, message in enumerate(messages):
        where = f"row {index}, message {m}"
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ConfigError(f"{where}: a message must be {{'role': ..., 'content': ...}}, got {message!r}")
        parts = []
        for part in _parts(message.get("content", ""), where):
            if part["type"] == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
                continue
            n_parts += 1
            if message["role"] == "assistant":
                raise ConfigError(f"{where}: an assistant message holds an image; images may be in user or "
                                  "system messages only (the model reads images, it does not write them)")
            value = next((part[k] for k in _IMAGE_KEYS if k in part), None)
            if value is None:
                if not pool:
                    raise ConfigError(f"{where}: an image part has no image (no 'image' value and the row's "
                                      f"{images_column!r} column has no image left for it): add the image")
                value = pool.pop(0)
            images.append(load_image(value, root, where))
            parts.append({"type": "image"})
        out.append({"role": message["role"], "content": parts})
    if pool:
        raise ConfigError(f"row {index}: {images_column!r} has {len(pool)} more image(s) than the messages' "
                          f"{n_parts} image part(s): add a {{'type': 'image'}} part for each image")
    if not any(m["role"] == "assistant" for m in out):
        raise ConfigError(f"row {index}: no assistant message, so nothing to train on: add the reply")
    return out, images


class ImageChatEncoder:
    """Encodes rows ``(messages, images)`` into a training micro-batch with the processor."""

    def __init__(self, processor: Any, max_len: int) -> None:
        self.processor, self.max_len = processor, max_len
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "right"
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            raise ConfigError(f"the processor's tokenizer {self._name()!r} has no pad (or EOS) token")
        image_token = getattr(processor, "image_token", None)
        image_id = getattr(processor, "image_token_id", None)
        if image_id is None and image_token is not None:
            image_id = self.tokenizer.convert_tokens_to_ids(image_token)
        # the ids the image features replace (Gemma3's image_token_id is its <start_of_image>, not the soft tokens)
        self.image_token_ids = [i for i in {image_id, *(getattr(processor, "image_token_ids", None) or [])}
                                if i is not None]
        self._spans: dict[int, list[tuple[int, int]]] = {}
        self._warned: set[int] = set()

    def _name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", None) or type(self.processor).__name__

    def render(self, messages: list[Message], generation: bool, index: int) -> str:
        """The chat template's text for ``messages`` (one row)."""
        try:
            return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception as err:  # jinja2 errors, KeyError, ...
            raise ConfigError(f"row {index}: the chat template of {self._name()!r} failed: "
                              f"{type(err).__name__}: {first_line(err)}") from err

    def encode(self, texts: list[str], images: list[list[Any]], where: str) -> dict[str, torch.Tensor]:
        """The processor's tensors for a list of rendered texts and their images."""
        nested = images if any(images) else None
        try:
            out = self.processor(text=texts, images=nested, padding=True, return_tensors="pt",
                                 add_special_tokens=False)
        except Exception as err:
            raise ConfigError(f"{where}: the processor {type(self.processor).__name__} failed: "
                              f"{type(err).__name__}: {first_line(err)}") from err
        return dict(out)

    def assistant_spans(self, messages: list[Message], images: list[Any], index: int,
                        full_ids: torch.Tensor) -> list[tuple[int, int]]:
        """``[start, end)`` token spans of the assistant turns (cached per row index).

        A closing assistant turn (the usual single-turn row) costs no extra processor call: it ends the
        row, and its text holds no image, so its tokens are the tokenizer's for that text when they match
        the row's tail. Other turns are measured by encoding their prefixes with their images."""
        if index in self._spans:
            return self._spans[index]
        spans, n_images = [], 0
        for i, message in enumerate(messages):
            before = n_images
            n_images += sum(p["type"] == "image" for p in message["content"])
            if message["role"] != "assistant":
                continue
            if i == len(messages) - 1 and (start := self._closing_start(messages, index, full_ids)) is not None:
                spans.append((start, len(full_ids)))
                continue
            start = self._prefix_len(messages[:i], True, images[:before], index, full_ids)
            spans.append((start, self._prefix_len(messages[: i + 1], False, images[:n_images], index, full_ids)))
        self._spans[index] = spans
        return spans

    def _closing_start(self, messages: list[Message], index: int, full_ids: torch.Tensor) -> int | None:
        """Where a final assistant turn starts, from its text alone; None when its tokens do not end the row."""
        prompt, full = self.render(messages[:-1], True, index), self.render(messages, False, index)
        if not full.startswith(prompt):
            return None
        tail = torch.tensor(self.tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"],
                            dtype=full_ids.dtype)
        n = len(tail)
        return len(full_ids) - n if 0 < n <= len(full_ids) and torch.equal(full_ids[-n:], tail) else None

    def _prefix_len(self, messages: list[Message], generation: bool, images: list[Any], index: int,
                    full_ids: torch.Tensor) -> int:
        ids = self.encode([self.render(messages, generation, index)], [images], f"row {index}")["input_ids"][0]
        if len(ids) > len(full_ids) or not torch.equal(ids, full_ids[: len(ids)]):
            raise ConfigError(f"row {index}: the chat template of {self._name()!r} does not encode a conversation "
                              "prefix as the start of the whole conversation, so assistant turns cannot be located")
        return len(ids)

    def batch(self, rows: list[tuple[list[Message], list[Any]]], indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A right-padded, shifted micro-batch: ``input_ids``, ``labels``, ``loss_mask``, ``num_tokens`` plus
        every tensor the processor returns (per-token ones shifted and cut like ``input_ids``)."""
        texts = [self.render(messages, False, i) for (messages, _), i in zip(rows, indices)]
        enc = self.encode(texts, [images for _, images in rows], f"rows {list(indices)}")
        ids = enc.pop("input_ids")
        bsz, width = ids.shape
        lengths = enc["attention_mask"].sum(1) if "attention_mask" in enc else torch.full((bsz,), width)
        target = torch.zeros(bsz, width, dtype=torch.float32)
        for b, ((messages, images), i) in enumerate(zip(rows, indices)):
            for start, end in self.assistant_spans(messages, images, i, ids[b, : int(lengths[b])]):
                target[b, start:end] = 1.0
            self._check_length(int(lengths[b]), ids[b], i)
        keep = min(width - 1, self.max_len)
        batch = {"input_ids": ids[:, :keep], "labels": ids[:, 1: keep + 1], "loss_mask": target[:, 1: keep + 1]}
        for key, value in enc.items():
            per_token = torch.is_tensor(value) and not value.is_floating_point() and value.dim() >= 2 \
                and tuple(value.shape[:2]) == (bsz, width)
            batch[key] = value[:, :keep] if per_token else value
        batch["num_tokens"] = (lengths - 1).clamp(max=keep).to(torch.int64)
        return batch

    def _check_length(self, length: int, ids: torch.Tensor, index: int) -> None:
        if length - 1 <= self.max_len:
            return
        if bool(torch.isin(ids[self.max_len: length], torch.tensor(self.image_token_ids, dtype=ids.dtype)).any()):
            raise ConfigError(f"row {index} has {length - 1} tokens and seq_length={self.max_len} would cut its "
                              "image tokens: raise seq_length or use smaller images")
        if index not in self._warned:
            self._warned.add(index)
            log.warning("row %d has %d tokens and is truncated at seq_length=%d (a cut reply loses its "
                        "end-of-turn token)", index, length - 1, self.max_len)
