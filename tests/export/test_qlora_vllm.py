"""A QLoRA run (4-bit NF4 base + LoRA) exports like a LoRA run: merged into the full-precision base,
served by a real vLLM engine, generating what transformers generates from the same export."""

from __future__ import annotations

import json

import fiddle as fdl
import pytest
import torch
from export_support import MAX_TOKENS, MEMORIZED, PROMPTS, ROTATED, rotated_dataset
from test_vllm_engine import assert_nontrivial, hf_greedy, token_ids
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.export import GenerationJob, export, generate_jobs
from tests.helpers import require_module, train_losses

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def qlora_export(sft_export, tmp_path_factory):
    """LoRA on the memorized SFT model quantized to NF4, until it gives each question the next answer."""
    require_module("bitsandbytes", "QLoRA needs bitsandbytes: pip install '.[qlora]'")
    root = tmp_path_factory.mktemp("qlora")
    run = llm.api.finetune(
        model=llm.HFAutoModelForCausalLM(str(sft_export), quantization="nf4"),
        peft=llm.peft.LoRA(target_modules=["*_proj"], dim=8, alpha=32),
        data=llm.HFDatasetDataModule(rotated_dataset(), formatting="chat", seq_length=64, micro_batch_size=4,
                                     global_batch_size=8),
        optim=fdl.build(llm.adam.pytorch_adam_with_cosine_annealing(max_lr=1e-2, warmup_steps=5, min_lr=1e-4,
                                                                    weight_decay=0.0)),
        trainer=nl.Trainer(max_steps=40, log_every_n_steps=1, enable_progress_bar=False),
        log=nl.NeMoLogger(log_dir=str(root), name="qlora"),
    )
    assert train_losses(run)[-1] < MEMORIZED, train_losses(run)
    return export(run, root / "qlora-merged", mode="merged")


def test_qlora_merged_export_serves_in_vllm(vllm_python, qlora_export, sft_export):
    config = json.loads((qlora_export / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", "float32") == "float32"
    [completions] = generate_jobs([GenerationJob(qlora_export, PROMPTS, MAX_TOKENS)], dtype="float32", python=vllm_python)
    vllm_ids = token_ids(completions)
    assert_nontrivial(vllm_ids)
    tok = AutoTokenizer.from_pretrained(qlora_export)
    assert vllm_ids == hf_greedy(AutoModelForCausalLM.from_pretrained(qlora_export, dtype=torch.float32), tok, PROMPTS)
    # learned on the 4-bit base, the adapter still routes the full-precision base's replies
    assert [c.text.strip() for c in completions[:4]] == [ROTATED[p] for p in PROMPTS[:4]]
