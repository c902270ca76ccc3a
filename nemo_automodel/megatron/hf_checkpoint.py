"""A HF checkpoint's tensors read one at a time from its safetensors files.

Loading through transformers first materializes the whole HF model on every rank (a full copy
whenever the checkpoint's dtype differs from the training dtype, as with bf16 Hub checkpoints and
fp32 training). `SafetensorsCheckpoint` is a read-only mapping from HF tensor names to tensors
that opens each file memory-mapped and reads a tensor only when asked, so the HF -> Megatron
load holds one full tensor at a time besides this rank's model slice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nemo_automodel.models.hf_save import INDEX_FILE

if TYPE_CHECKING:
    from safetensors import safe_open

SINGLE_FILE = "model.safetensors"


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """The tensors of ``folder``'s ``model.safetensors`` (or the shards its index names), by HF name."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        if (folder / INDEX_FILE).is_file():
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
            self._files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / SINGLE_FILE).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
                self._files = {name: folder / SINGLE_FILE for name in f.keys()}  # noqa: SIM118 (not a mapping)
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
        self._handles: dict[Path, safe_open] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._files[name]  # KeyError for a name the checkpoint lacks, like a dict
        if path not in self._handles:
            from safetensors import safe_open

            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def checkpoint_folder(model_id: str, revision: str | None = None) -> Path | None:
    """The local folder holding ``model_id``'s safetensors: the folder itself, or the Hub snapshot
    (downloading only safetensors and json files); None when the checkpoint has no safetensors."""
    folder = Path(model_id).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_id, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
    if (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file():
        return folder
    return None
