"""The VLM tutorial runs end to end on the wheel's real digits: loss falls, and the tuned model reads held-out
digits that the base model cannot (a margin measured on the 180 held-out images), and so does its reload."""

from __future__ import annotations

import re

import pytest

from tests.test_tutorials import run_tutorial

STEPS = 120  # 24.4 % held-out accuracy measured here after 120 steps (base 0 %); the test asks for half that margin


def _percent(stdout: str, label: str) -> float:
    match = re.search(rf"^{label}[^\n]*?: ([\d.]+)%", stdout, re.M)
    assert match, f"no {label!r} line in:\n{stdout[-3000:]}"
    return float(match.group(1)) / 100


@pytest.mark.slow
def test_vlm_digits_tutorial(tiny_vlm_dir, tmp_path):
    stdout = run_tutorial("vlm_digits.py", tiny_vlm_dir("idefics3"), tmp_path / "out", "--max-steps", str(STEPS),
                          "--samples", "1617")
    assert "num_rows: 1617" in stdout
    assert "Assistant:[[" in stdout  # the reply carries the loss; the image tokens were dropped from the line
    first, last = map(float, re.search(r"train loss: first ([\d.]+) -> last ([\d.]+)", stdout).groups())
    assert last < 0.5 * first, (first, last)
    base, tuned = _percent(stdout, "base model"), _percent(stdout, "tuned model")
    assert tuned >= base + 0.12, (base, tuned)
    assert _percent(stdout, "reloaded from") == tuned  # the saved HF folder answers like the trained model
    assert "data.path_or_dataset.split: str = 'train'" in stdout  # the recipe graph: the dataset is a node
    assert "model.freeze_vision_tower: bool = False" in stdout
