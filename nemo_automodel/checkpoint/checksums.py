"""Checkpoints that verify themselves: every file's size and SHA-256, recorded in ``meta.json``.

``record`` hashes a finished checkpoint folder (rank 0, while it flushes the files to disk);
``damage`` re-reads a checkpoint and names the first file that is missing, truncated or changed,
or a ``meta.json`` that does not parse. Checkpoints written before checksums existed are checked
for their ``meta.json`` and ``trainer-rank0.pt`` only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

META = "meta.json"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record(root: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``root`` except ``meta.json``; every
    file and folder below ``root`` is flushed to disk (fsync) on the way."""
    files = {}
    for path in sorted(root.rglob("*")):
        fsync(path)
        if path.is_file() and path.name != META:
            files[str(path.relative_to(root))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return files


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(ckpt: Path) -> dict:
    """``meta.json`` of a checkpoint (raises OSError / ValueError when missing or unreadable)."""
    return json.loads((Path(ckpt) / META).read_text())


def damage(ckpt: Path) -> str | None:
    """What is wrong with checkpoint ``ckpt`` (one phrase naming the file), or None when it verifies."""
    ckpt = Path(ckpt)
    try:
        meta = read_meta(ckpt)
    except FileNotFoundError:
        return f"{META} is missing"
    except (OSError, ValueError) as err:
        return f"{META} is unreadable ({type(err).__name__})"
    if not isinstance(meta, dict) or "step" not in meta:
        return f"{META} has no step"
    files = meta.get("files") or {"trainer-rank0.pt": None}
    for rel, want in files.items():
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        if want is None:
            continue
        size = path.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} were written"
        if _sha256(path) != want["sha256"]:
            return f"{rel} does not match its checksum"
    return None
