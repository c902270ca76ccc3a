"""Fixtures for the multi-process tests: a small-vocab model and pre-tokenized data (see harness.py).

Every folder here is built once per run and shared by the xdist workers (``tests/parallel.py``): the test
files that read the same launches may run on different workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness import SGD, STEPS, launch

from tests.helpers import write_token_rows
from tests.parallel import shared_build


@pytest.fixture(scope="session")
def small_model(tmp_path_factory, tokenizer) -> Path:
    """A tied-embedding Llama with a 512-token vocabulary (fast), saved with a real tokenizer."""
    import transformers

    def build(out: Path) -> None:
        cfg = transformers.LlamaConfig(vocab_size=512, tie_word_embeddings=True, hidden_size=64,
                                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                                       eos_token_id=2)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return shared_build(tmp_path_factory, "distributed-small-llama", build)


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
    """16 pre-tokenized rows of 12-40 tokens (learnable: arithmetic sequences of ids in 3..499)."""
    return shared_build(tmp_path_factory, "distributed-tokens", lambda out: write_token_rows(out / "train.jsonl", 16)) \
        / "train.jsonl"


@pytest.fixture(scope="session")
def config(small_model, token_data) -> dict[str, dict]:
    """The training set-ups (a run adds name, log_dir, out, ...); all use global batch 4 for 8 steps."""
    base = {"model": str(small_model), "data": str(token_data), "steps": STEPS, "total": STEPS,
            "micro": 2, "global": 4}
    return {"ddp-sft": {**base, "strategy": "ddp", "micro": 1},  # 2 micro-batches per step and rank
            "fsdp2-lora": {**base, "strategy": "fsdp2", "peft": True},
            "fsdp2-sft": {**base, "strategy": "fsdp2", "micro": 1},
            "single-sft": base, "single-lora": {**base, "peft": True}}


def _sgd(tmp: Path, sft: dict, lora: dict | None = None) -> list[dict]:
    """SGD runs ``sgd-{kind}`` (out/init.pt, out/final.pt) of the full SFT set-up and, given ``lora``, LoRA and DoRA."""
    kinds = {"sft": sft, **({"lora": lora, "dora": {**lora, "peft": "dora"}} if lora else {})}
    return [{**cfg, **SGD, "log_dir": str(tmp / "runs"), "name": f"sgd-{kind}", "out": str(tmp / f"sgd-{kind}")}
            for kind, cfg in kinds.items()]


def _trio(cfg: dict, tmp: Path, kind: str, stop: int) -> list[dict]:
    """An uninterrupted run, then one stopped at ``stop`` and resumed in the same run directory."""
    common = {**cfg, "log_dir": str(tmp / "runs")}
    return [{**common, "name": f"{kind}-full", "out": str(tmp / f"{kind}-full")},
            {**common, "name": f"{kind}-split", "steps": stop},
            {**common, "name": f"{kind}-split", "resume": True, "out": str(tmp / f"{kind}-resumed")}]


@pytest.fixture(scope="session")
def ddp(tmp_path_factory, config) -> Path:
    """torchrun x2, DDP full SFT (also counting gradient all-reduces and saving each rank's weights), and its
    SGD run."""
    def build(tmp: Path) -> None:
        runs = _trio(config["ddp-sft"], tmp, "sft", 3)
        runs[0].update(count_syncs=True, per_rank=True)
        launch(tmp, runs + _sgd(tmp, config["ddp-sft"]))

    return shared_build(tmp_path_factory, "distributed-ddp", build)


@pytest.fixture(scope="session")
def fsdp2(tmp_path_factory, config) -> Path:
    """torchrun x2, FSDP2: LoRA (stop at 3) and full SFT with accumulation (stop at 5); SGD runs of SFT,
    LoRA and DoRA."""
    return shared_build(tmp_path_factory, "distributed-fsdp2", lambda tmp: launch(
        tmp, _trio(config["fsdp2-lora"], tmp, "lora", 3) + _trio(config["fsdp2-sft"], tmp, "sft", 5)
        + _sgd(tmp, config["fsdp2-sft"], config["fsdp2-lora"])))


@pytest.fixture(scope="session")
def single(tmp_path_factory, config, fsdp2) -> Path:
    """One process: the single-device references (SGD ones too), and FSDP2's step-5 checkpoint resumed on 1 rank."""
    saved_on_2 = fsdp2 / "runs" / "sft-split" / "checkpoints" / "step-000005"

    def build(tmp: Path) -> None:
        common = {"log_dir": str(tmp / "runs")}
        launch(tmp, [{**config["single-sft"], **common, "name": "sft-full", "out": str(tmp / "sft-full")},
                     {**config["single-lora"], **common, "name": "lora-full", "out": str(tmp / "lora-full")},
                     {**config["single-sft"], **common, "name": "from-2-ranks", "resume_from": str(saved_on_2),
                      "out": str(tmp / "from-2-ranks")}, *_sgd(tmp, config["single-sft"], config["single-lora"])],
               nproc=1)

    return shared_build(tmp_path_factory, "distributed-single", build)


@pytest.fixture(scope="session")
def fsdp2_memory(tmp_path_factory, config) -> Path:
    """torchrun x2, FSDP2 with activation checkpointing (LoRA stopped at 3 and resumed; full SFT), LoRA
    with precision='bf16-true', and LoRA and full SFT with the chunked loss; compared with the `fsdp2` runs,
    which keep every activation and the full logits."""
    ckpt = {"activation_checkpointing": True}

    def build(tmp: Path) -> None:
        runs = _trio({**config["fsdp2-lora"], **ckpt}, tmp, "lora", 3)
        runs.append({**config["fsdp2-sft"], **ckpt, "log_dir": str(tmp / "runs"), "name": "sft-full",
                     "out": str(tmp / "sft-full")})
        runs.append({**config["fsdp2-lora"], "precision": "bf16-true", "log_dir": str(tmp / "runs"),
                     "name": "lora-bf16-true", "out": str(tmp / "lora-bf16-true")})
        for kind in ("lora", "sft"):
            runs.append({**config[f"fsdp2-{kind}"], "chunked_loss": True, "log_dir": str(tmp / "runs"),
                         "name": f"{kind}-chunked", "out": str(tmp / f"{kind}-chunked")})
        launch(tmp, runs)

    return shared_build(tmp_path_factory, "distributed-fsdp2-memory", build)
