"""Session fixtures: the tiny random VLMs of ``nemo_automodel.demo.tiny_vlm``, each built once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.parallel import shared_build


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_vlm_dir(family, seed=0)``: the folder of that tiny VLM, built on first use (once per run, shared
    by the xdist workers)."""
    from nemo_automodel.demo.tiny_vlm import build_tiny_vlm

    def get(family: str, seed: int = 0) -> Path:
        return shared_build(tmp_path_factory, f"vlm-{family}-{seed}", lambda out: build_tiny_vlm(family, out, seed=seed))

    return get


@pytest.fixture(scope="session")
def digit_image():
    """A fixed 28x28 RGB image (a bright bar on noise) standing in for a handwritten digit."""
    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(0).randint(0, 64, size=(28, 28, 3)).astype("uint8")
    pixels[4:24, 12:16] = 255
    return Image.fromarray(pixels)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster than several on a shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
