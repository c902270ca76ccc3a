"""``HFImageTextDataModule`` on the text module's base (``data/base.py``): NeMo's DataLoader knobs are dropped
before ``load_dataset``, ``setup`` loads again when what the rows depend on changes, the position resumes
exactly (also when loaded before ``setup``), and a validation tail that does not fill every rank is skipped
with a warning."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch
from datasets import Dataset, DatasetDict

from nemo_automodel.data.image_datamodule import HFImageTextDataModule
from nemo_automodel.models.processor import load_processor


def _chat(i: int, image) -> dict:
    """A one-turn chat whose reply (``str(i)`` repeated) tells the rows apart."""
    return {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": f"{i} " * (1 + i % 3)}]}],
            "images": [image]}


@pytest.fixture(scope="module")
def processor(tiny_vlm_dir):
    return load_processor(str(tiny_vlm_dir("qwen2_vl")))


def _ids(dm: HFImageTextDataModule, n: int) -> list[torch.Tensor]:
    return [b["input_ids"] for b in itertools.islice(dm.train_batches(), n)]


def test_loader_knobs_are_dropped_and_a_changed_seq_length_loads_again(processor, digit_image, tmp_path):
    digit_image.save(tmp_path / "d.png")
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(_chat(i, "d.png")) + "\n" for i in range(4)))
    dm = HFImageTextDataModule(str(path), seq_length=256, micro_batch_size=4, shuffle=False,
                               num_workers=2, pin_memory=True, persistent_workers=True)
    assert dm.load_kwargs == {}
    dm.setup(processor)  # load_dataset(json, num_workers=2, ...) would refuse the unknown config keys
    full = _ids(dm, 1)[0]
    width = full.shape[1] - 2  # cuts the end of the longest replies, no image token
    dm.seq_length = width
    dm.setup(processor)  # the rows are checked again and the encoder rebuilt for the new seq_length
    cut = _ids(dm, 1)[0]
    assert cut.shape == (4, width) and torch.equal(cut, full[:, :width])


def test_resume_continues_exactly_also_before_setup(processor, digit_image):
    rows = Dataset.from_list([_chat(i, digit_image) for i in range(5)])

    def module() -> HFImageTextDataModule:
        return HFImageTextDataModule(rows, seq_length=256, micro_batch_size=2, seed=3)

    reference = module()
    reference.setup(processor)
    assert reference.micro_batches_per_epoch == 2
    expected = _ids(reference, 5)
    first = module()
    first.setup(processor)
    seen = _ids(first, 3)
    assert first.state_dict() == {"epoch": 1, "batch_in_epoch": 1}
    resumed = module()
    resumed.load_state_dict(first.state_dict())
    resumed.setup(processor)
    got = seen + _ids(resumed, 2)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(expected[:2], expected[2:4], strict=True))  # reshuffled


def test_validation_tail_is_skipped_on_every_rank_with_a_warning(processor, digit_image, caplog):
    rows = DatasetDict(train=Dataset.from_list([_chat(i, digit_image) for i in range(4)]),
                       validation=Dataset.from_list([_chat(i, digit_image) for i in range(5)]))
    shards = []
    for rank in (0, 1):
        dm = HFImageTextDataModule(rows, val_split="val", seq_length=256, micro_batch_size=2)
        dm.setup(processor, dp_rank=rank, dp_size=2)
        assert len(dm.val_dataset) == 5
        with caplog.at_level(logging.WARNING, logger="nemo_automodel.data.base"):
            shards.append([b["input_ids"].shape[0] for b in dm.val_batches()])
    assert shards == [[2], [2]]
    assert caplog.text.count("val_split: 1 rows do not fill a micro-batch on every rank") == 2
