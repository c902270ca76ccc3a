"""Small builders shared by the end-to-end tests."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

STRICT_ENV = "NEMO_AUTOMODEL_STRICT"  # set by .ci/run: a missing engine, venv or extra fails instead of skipping


def unavailable(reason: str):
    """Skip the test for a missing engine, venv or extra, or fail it under ``.ci/run`` (``STRICT_ENV``)."""
    if os.environ.get(STRICT_ENV) == "1":
        pytest.fail(f"{reason} ({STRICT_ENV}=1: CI must provide it)", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, reason: str):
    """``pytest.importorskip`` that fails under ``.ci/run``."""
    try:
        return importlib.import_module(name)
    except ImportError:
        unavailable(f"{reason} (cannot import {name})")

QA = [("What is the capital of France?", "Paris is the capital of France."),
      ("Name a primary colour.", "Red is a primary colour."),
      ("What is two plus two?", "Two plus two is four."),
      ("Which animal barks?", "A dog barks."),
      ("What do bees make?", "Bees make honey."),
      ("What is frozen water called?", "Frozen water is called ice."),
      ("How many legs does a spider have?", "A spider has eight legs."),
      ("What colour is the sky on a clear day?", "The sky is blue on a clear day.")]


def chat_dataset(repeat: int = 2):
    """A small ``datasets.Dataset`` of chats (imported here: the gpu tests run without datasets)."""
    from datasets import Dataset

    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    return Dataset.from_list(rows * repeat)


def write_token_rows(path: Path, n: int) -> Path:
    """``n`` pre-tokenized rows of 12-40 tokens (learnable: arithmetic sequences of ids in 3..499) as jsonl."""
    import torch

    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        length, start, stride = (int(torch.randint(lo, hi, (1,), generator=gen))
                                 for lo, hi in ((12, 41), (0, 497), (1, 4)))
        rows.append({"input_ids": [3 + (start + stride * i) % 497 for i in range(length)]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in metrics(run_dir) if "train_loss" in r]
