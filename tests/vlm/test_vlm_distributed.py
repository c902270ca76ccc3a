"""VLMs under FSDP2 / DDP on 2 gloo processes equal one process (AdamW curves and weights; plain-SGD steps by
weights), and stop/resume is bitwise.

Two process starts serve every test: torchrun x2 (FSDP2: LoRA on Qwen2-VL, full SFT on Idefics3 with its
vision tower frozen, LoRA with dropout uninterrupted and stopped at 3 + resumed, 2 SGD steps of the full SFT; DDP
LoRA) and one plain process (the same runs: the references, and the single-process stop/resume). 8 image chats, global batch 4,
shuffled: 6 steps cross two epoch boundaries.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import SGD, assert_sgd_runs_equal, launch, losses, max_diff, meta

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("vlm_worker.py")
STEPS, STOP = 6, 3
CURVE_RTOL = 1e-5  # the same samples per step; only the order of float sums differs
# trainable weights after 6 AdamW steps, 2 ranks vs 1: measured 1.5e-8 (LoRA), 1.2e-7 (full SFT), 0 (DDP)
WEIGHT_ATOL = 1e-5


@pytest.fixture(scope="module")
def image_chats(tmp_path_factory) -> Path:
    """8 one-image chats "What digit is this?" -> the digit, the images PNG files beside the JSONL."""
    import numpy as np
    from PIL import Image

    out = tmp_path_factory.mktemp("image-chats")
    rng = np.random.RandomState(0)
    with (out / "train.jsonl").open("w") as f:
        for digit in range(8):
            pixels = rng.randint(0, 64, size=(28, 28, 3)).astype("uint8")
            pixels[4:24, 2 + 3 * digit:5 + 3 * digit] = 255  # a bar whose position is the answer
            Image.fromarray(pixels).save(out / f"digit{digit}.png")
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit is this?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": f"The digit is {digit}."}]}]
            f.write(json.dumps({"messages": messages, "images": [f"digit{digit}.png"]}) + "\n")
    return out / "train.jsonl"


@pytest.fixture(scope="module")
def setups(tiny_vlm_dir, image_chats) -> dict[str, dict]:
    base = {"data": str(image_chats), "steps": STEPS, "total": STEPS, "micro": 2, "global": 4}
    lora = {**base, "model": str(tiny_vlm_dir("qwen2_vl")), "peft": True}
    sft = {**base, "model": str(tiny_vlm_dir("idefics3")), "lr": 1e-3, "micro": 1}  # 2 micro-batches per rank
    return {"lora": lora, "sft": sft}


def _runs(tmp: Path, setups: dict, strategy: str | None) -> list[dict]:
    """LoRA and full SFT without dropout (ranks draw their own dropout masks: only dropout-free training
    can equal one process), LoRA with dropout uninterrupted and stopped at STOP then resumed in the same
    run directory, 2 plain-SGD steps of the full SFT (out/init.pt too), and on 2 ranks DDP LoRA."""
    common = {"log_dir": str(tmp / "runs"), "strategy": strategy}
    lora = {**setups["lora"], **common}
    runs = [{**lora, "dropout": 0.0, "name": "lora", "out": str(tmp / "lora")},
            {**setups["sft"], **common, "name": "sft", "out": str(tmp / "sft")},
            {**lora, "name": "lora-full", "out": str(tmp / "lora-full")},
            {**lora, "name": "lora-split", "steps": STOP},
            {**lora, "name": "lora-split", "resume": True, "out": str(tmp / "lora-resumed")},
            {**setups["sft"], **common, **SGD, "name": "sgd-sft", "out": str(tmp / "sgd-sft")}]
    if strategy:
        runs.append({**lora, "dropout": 0.0, "strategy": "ddp", "name": "ddp-lora", "out": str(tmp / "ddp-lora")})
    return runs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, setups) -> Path:
    tmp = tmp_path_factory.mktemp("vlm-2-ranks")
    launch(tmp, _runs(tmp, setups, "fsdp2"), nproc=2, worker=WORKER)
    return tmp


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, setups) -> Path:
    tmp = tmp_path_factory.mktemp("vlm-1-rank")
    launch(tmp, _runs(tmp, setups, None), nproc=1, worker=WORKER)
    return tmp


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _assert_same_training(got_dir: Path, ref_dir: Path, got_out: Path, ref_out: Path, what: str) -> None:
    got, ref = losses(got_dir), losses(ref_dir)
    assert len(got) == len(ref) == STEPS
    worst = max(abs(a - b) / b for a, b in zip(got, ref))
    diff = max_diff(_load(got_out / "trainable.pt"), _load(ref_out / "trainable.pt"))
    print(f"{what} vs one process: max relative loss difference {worst:.2e}, max trainable weight difference {diff:.2e}")
    assert worst < CURVE_RTOL, (got, ref)
    assert diff < WEIGHT_ATOL


@pytest.mark.parametrize("kind", ["lora", "sft"])
def test_fsdp2_equals_one_process(two_ranks, one_rank, kind):
    _assert_same_training(two_ranks / "runs" / kind, one_rank / "runs" / kind, two_ranks / kind, one_rank / kind,
                          f"FSDP2 {kind}")
    assert meta(two_ranks / "runs" / kind)["world_size"] == 2
    curve = losses(two_ranks / "runs" / kind)
    assert curve[-1] < curve[0], curve  # it trains


def test_fsdp2_sgd_steps_equal_one_process(two_ranks, one_rank):
    """AdamW's curves hide a wrong gradient scale; 2 plain-SGD steps compared by weights do not."""
    assert_sgd_runs_equal(two_ranks / "sgd-sft", one_rank / "sgd-sft", "VLM FSDP2 sft", weights="trainable.pt")


def test_ddp_lora_equals_one_process(two_ranks, one_rank):
    _assert_same_training(two_ranks / "runs" / "ddp-lora", one_rank / "runs" / "lora", two_ranks / "ddp-lora",
                          one_rank / "lora", "DDP LoRA")


@pytest.mark.parametrize("kind", ["lora", "sft"])
def test_fsdp2_shards_vision_blocks_and_decoder_layers(two_ranks, kind):
    found = json.loads((two_ranks / kind / "sharded.json").read_text())
    (tower,), decoder = found["towers"], found["decoder"]
    vision = [b for b in found["blocks"] if b.startswith(tower + ".")]
    text = [b for b in found["blocks"] if b.startswith(decoder + ".layers.")]
    # 2 of each in these tiny models; Idefics3's vision blocks are its layers' self_attn (the class its
    # _no_split_modules lists), Qwen2-VL's are whole visual.blocks.N
    assert len(vision) == len(text) == 2, found["blocks"]
    assert set(found["fsdp"]) == {"", *vision, *text}  # every block and the root, nothing else
    trainable = found["trainable"]
    assert trainable and not any(n.startswith(tower + ".") for n in trainable)  # the tower stays frozen
    if kind == "lora":
        assert all(".lora_" in n and n.startswith(decoder + ".")
                   for n in trainable), trainable


def _assert_bitwise_resume(tmp: Path) -> None:
    assert losses(tmp / "runs" / "lora-full") != losses(tmp / "runs" / "lora")  # the dropout masks count
    assert meta(tmp / "runs" / "lora-split")["resumed_from"] == STOP
    assert losses(tmp / "runs" / "lora-split") == losses(tmp / "runs" / "lora-full")
    full, resumed = _load(tmp / "lora-full" / "trainable.pt"), _load(tmp / "lora-resumed" / "trainable.pt")
    assert full.keys() == resumed.keys() and full
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_stop_and_resume_is_bitwise_one_process(one_rank):
    _assert_bitwise_resume(one_rank)


def test_stop_and_resume_is_bitwise_fsdp2(two_ranks):
    _assert_bitwise_resume(two_ranks)
