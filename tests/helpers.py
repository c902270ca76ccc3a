"""Small builders shared by the end-to-end tests."""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import json
import os
import sys
import threading
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


# file, directory, process and network audit events (PEP 578) `recorded_io` reports
IO_EVENTS = ("open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rename", "os.system", "os.posix_spawn",
             "subprocess.Popen", "socket.connect", "socket.getaddrinfo")
MODULE_SUFFIXES = tuple(importlib.machinery.all_suffixes())  # what an import reads: .py, .pyc, extension modules
_recorders: list[tuple[int | None, list]] = []  # (thread id or None for every thread, events) per `recorded_io`


def _audit(event: str, args: tuple) -> None:
    if not _recorders or event not in IO_EVENTS:
        return
    target = args[1] if event == "socket.connect" else args[0]
    if isinstance(target, (bytes, os.PathLike)):
        target = os.fsdecode(target)
    if event == "open" and isinstance(target, str) and target.endswith(MODULE_SUFFIXES):
        return  # an import reading a module file
    thread = threading.get_ident()
    for only, events in _recorders:
        if only in (None, thread):
            events.append((event, target))


sys.addaudithook(_audit)  # a hook cannot be removed: this one records only inside `recorded_io`


@contextlib.contextmanager
def recorded_io(all_threads: bool = False):
    """The I/O done inside the block, as ``(event, target)``: files opened (other than the module files
    imports read), directories listed or changed, processes started, sockets connected or names resolved;
    by the current thread, or by every thread with ``all_threads``. Import what the block uses before it:
    an import may list new ``sys.path`` folders."""
    recorder: tuple[int | None, list] = (None if all_threads else threading.get_ident(), [])
    _recorders.append(recorder)
    try:
        yield recorder[1]
    finally:
        del _recorders[next(i for i, r in enumerate(_recorders) if r is recorder)]


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
