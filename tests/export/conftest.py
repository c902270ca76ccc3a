"""Fixtures for the export tests: a head_dim-64 Llama fine-tuned by us (full SFT, then LoRA on top),
its exports, and one vLLM process that answers every engine test's prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from export_support import (
    CONVERSATION,
    HEAD64,
    MAX_TOKENS,
    PROMPTS,
    SSM_LORA_TARGETS,
    SSM_PROMPTS,
    finetune,
    rotated_dataset,
    vllm_python_path,
)

from nemo_automodel import llm
from nemo_automodel.export import GenerationJob, export, generate_jobs
from tests.helpers import chat_dataset, unavailable
from tests.parallel import shared_build


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    path = vllm_python_path()
    if not path.exists():
        unavailable(f"no vLLM venv at {path}: run `make vllm-venv` (make test builds it)")
    return path


@pytest.fixture(scope="session")
def head64_base(tmp_path_factory, tokenizer) -> Path:
    """A random tied-embedding Llama (head_dim 64) with SmolLM2's real tokenizer and chat template."""
    import transformers

    def build(out: Path) -> None:
        cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **HEAD64,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return shared_build(tmp_path_factory, "export-head64-llama", build)


# The runs and exports below serve test files that xdist may hand to different workers: each is built once
# per `make test` (tests/parallel.py) and read by both.
@pytest.fixture(scope="session")
def sft_run(head64_base, tmp_path_factory) -> Path:
    """Full SFT until the model has memorized the QA replies (``finetune`` checks the loss)."""
    runs = shared_build(tmp_path_factory, "export-sft-run",
                        lambda out: finetune(head64_base, out, "sft", chat_dataset(), steps=100, lr=3e-3))
    return runs / "sft"


@pytest.fixture(scope="session")
def sft_export(sft_run, tmp_path_factory) -> Path:
    return shared_build(tmp_path_factory, "export-sft-merged", lambda out: export(sft_run, out / "sft-merged")) \
        / "sft-merged"


@pytest.fixture(scope="session")
def lora_run(sft_export, tmp_path_factory) -> Path:
    """LoRA on top of the SFT model, trained on 2 FSDP2 processes (a sharded checkpoint) until it gives
    each QA question the next question's answer."""
    lora = llm.peft.LoRA(target_modules=["*_proj"], dim=8, alpha=32)
    run = shared_build(tmp_path_factory, "export-lora-run",
                       lambda out: finetune(sft_export, out, "lora", rotated_dataset(), steps=40, lr=1e-2, peft=lora,
                                            micro_batch_size=4, devices=2, strategy="fsdp2")) / "lora"
    assert json.loads((run / "checkpoints" / "last" / "meta.json").read_text())["world_size"] == 2
    return run


@pytest.fixture(scope="session")
def lora_exports(lora_run, tmp_path_factory) -> dict[str, Path]:
    def build(out: Path) -> None:
        export(lora_run, out / "lora-adapter", mode="adapter")
        export(lora_run / "checkpoints" / "last", out / "lora-merged", mode="merged")

    out = shared_build(tmp_path_factory, "export-lora-exports", build)
    return {"adapter": out / "lora-adapter", "merged": out / "lora-merged"}


@pytest.fixture(scope="session")
def moe_export(tmp_path_factory, tokenizer) -> Path:
    """A tiny Qwen3-MoE (4 experts, top-2; head_dim 32: vLLM's CPU attention refuses 16) fine-tuned by us (full
    SFT, router load-balancing loss on) until it memorized the QA replies, and exported."""
    import transformers

    def build(out: Path) -> None:
        cfg = transformers.Qwen3MoeConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, hidden_size=128,
                                          intermediate_size=256, moe_intermediate_size=128, num_experts=4,
                                          num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out / "base")
        tokenizer.save_pretrained(out / "base")
        run = finetune(out / "base", out, "moe", chat_dataset(), steps=100, lr=3e-3)
        export(run, out / "moe-merged")

    return shared_build(tmp_path_factory, "export-moe-merged", build) / "moe-merged"


def _nemotron_h_base(out: Path, tokenizer) -> Path:
    """The session's tiny Nemotron-H layout (``M*M-``: Mamba, attention, Mamba, MLP) with head_dim 32 (vLLM's CPU
    attention refuses 16) and initializer_range 0.1 (Mamba2's default): at Nemotron-H's 0.02 a random base's
    conv1d and attention carry so little of the question to the reply that LoRA stalls at loss ~0.25, every
    reply's first token a guess among the eight answers (measured)."""
    import transformers

    cfg = transformers.NemotronHConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, hybrid_override_pattern="M*M-",
        num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, head_dim=32, mamba_num_heads=8,
        mamba_head_dim=16, ssm_state_size=16, n_groups=1, expand=2, chunk_size=16, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def ssm_exports(tmp_path_factory, tiny_model_factory, tokenizer) -> dict[str, Path]:
    """A tiny Mamba2 (the session's) and a Mamba/attention hybrid (Nemotron-H), each LoRA-trained by us until it
    memorized the QA replies and exported merged (the adapters folded into in_proj, attention, MLP, lm_head)."""
    def build(out: Path) -> None:
        # (base, steps, peak lr) measured to reach train loss ~0.02: Nemotron-H diverges at 2e-2
        runs = {"mamba2": (tiny_model_factory("mamba2"), 60, 2e-2),
                "nemotron_h": (_nemotron_h_base(out / "nemotron_h-base", tokenizer), 100, 1e-2)}
        for family, (base, steps, lr) in runs.items():
            lora = llm.peft.LoRA(target_modules=SSM_LORA_TARGETS, dim=16, alpha=32)
            run = finetune(base, out, family, chat_dataset(), steps=steps, lr=lr, peft=lora)
            export(run, out / f"{family}-merged")

    out = shared_build(tmp_path_factory, "export-ssm-merged", build)
    return {family: out / f"{family}-merged" for family in ("mamba2", "nemotron_h")}


@pytest.fixture(scope="session")
def vllm_results(vllm_python, sft_export, lora_exports, moe_export, ssm_exports) -> dict[str, list]:
    """Every engine test's vLLM answers from one vLLM process (six engines, started once each)."""
    jobs = {
        "moe_merged": GenerationJob(moe_export, PROMPTS, MAX_TOKENS),
        **{f"{family}_merged": GenerationJob(path, SSM_PROMPTS, MAX_TOKENS) for family, path in ssm_exports.items()},
        "sft": GenerationJob(sft_export, PROMPTS, MAX_TOKENS),
        "sft_conversation": GenerationJob(sft_export, [CONVERSATION], MAX_TOKENS),
        "lora": GenerationJob(lora_exports["adapter"], PROMPTS, MAX_TOKENS),
        "lora_base": GenerationJob(lora_exports["adapter"], PROMPTS, MAX_TOKENS, use_adapter=False),
        "lora_merged": GenerationJob(lora_exports["merged"], PROMPTS, MAX_TOKENS),
    }
    results = generate_jobs(list(jobs.values()), dtype="float32", python=vllm_python)
    return dict(zip(jobs, results, strict=True))
