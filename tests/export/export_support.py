"""Constants and builders shared by the export tests (a module of its own: test files cannot import
``conftest`` reliably while several conftest.py files exist)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fiddle as fdl
import torch
from datasets import Dataset

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from tests.helpers import QA

ROOT = Path(__file__).resolve().parents[2]
# vLLM-CPU needs head_dim >= 32: 128 hidden / 2 heads = 64.
HEAD64 = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=512)
PROMPTS = [q for q, _ in QA[:4]] + ["Tell me a story."]
# One LoRA target list for both state-space families (a pattern that matches nothing in one only warns): Mamba2
# has in_proj alone (peft refuses a Mamba mixer's out_proj and conv1d), Nemotron-H also attention and MLP.
# lm_head too: on a random base the frozen head and final norm bound the logits (measured: without it the
# loss stalls near 5 and nothing is memorized).
SSM_LORA_TARGETS = ["in_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]
SSM_PROMPTS = PROMPTS[:4]  # trained questions only: their memorized replies give every greedy step a clear margin
CONVERSATION = [{"role": "system", "content": "You answer in one sentence."},
                {"role": "user", "content": "Which animal barks?"}, {"role": "assistant", "content": "A dog barks."},
                {"role": "user", "content": "What do bees make?"}]
MAX_TOKENS = 24
GREEDY_MARGIN = 1e-3  # transformers' top-1 minus top-2 logit at every greedy step; vLLM's fp32 differs by ~1e-5


@torch.no_grad()
def clear_greedy(model, inputs: dict, max_new_tokens: int, pad_token_id: int, what: str) -> list[int]:
    """transformers' greedy tokens after ``inputs`` (up to EOS), asserting that top-1 leads top-2 by more than
    ``GREEDY_MARGIN`` at every step: at a near-tie, exact parity with another engine would be luck."""
    gen = model.eval().generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=pad_token_id)
    top2 = torch.stack([s[0].topk(2).values for s in gen.scores])
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    assert margin > GREEDY_MARGIN, f"{what}: a greedy step's top-2 margin is {margin:.1e}: parity would be luck"
    return gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()


def vllm_python_path() -> Path:
    return Path(os.environ.get("NEMO_AUTOMODEL_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")


def finetune(model_path: Path, log_dir: Path, name: str, data: Dataset, steps: int, lr: float, peft=None,
             micro_batch_size: int = 8, **trainer_kw) -> Path:
    """Train to memorization: warmup + cosine decay takes the tiny model's loss on the 8 QA chats below
    ``MEMORIZED`` (flat LRs of 5e-3..1e-2 plateau near 1-3, where greedy replies depend on the CPU's float
    path), so greedy replies are the known training replies: the tests' output diversity comes from the data."""
    run = llm.api.finetune(
        model=llm.HFAutoModelForCausalLM(str(model_path)), peft=peft,
        data=llm.HFDatasetDataModule(data, formatting="chat", seq_length=64, micro_batch_size=micro_batch_size,
                                     global_batch_size=8),
        optim=fdl.build(llm.adam.pytorch_adam_with_cosine_annealing(max_lr=lr, warmup_steps=5, min_lr=lr / 100,
                                                                    weight_decay=0.0)),
        trainer=nl.Trainer(max_steps=steps, log_every_n_steps=1, enable_progress_bar=False, **trainer_kw),
        log=nl.NeMoLogger(log_dir=str(log_dir), name=name),
    )
    losses = [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "train_loss" in r]
    assert losses[-1] < MEMORIZED, f"{name}: train loss {losses[-1]:.3f} after {steps} steps: not memorized"
    return run


MEMORIZED = 0.1  # measured: ~0.02 (SFT, 100 steps) and ~0.03 (LoRA on 2 FSDP2 ranks, 40 steps)
# each QA question answered with the next pair's answer: distinct, known replies the SFT model already
# produces, so the adapter only has to re-route them (restyling them plateaued near loss 2)
ROTATED = {q: QA[(i + 1) % len(QA)][1] for i, (q, _) in enumerate(QA)}


def rotated_dataset() -> Dataset:
    """The QA questions with rotated answers: what the LoRA adapter learns on top of the SFT model."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in ROTATED.items()]
    return Dataset.from_list(rows * 2)


def lora_checkpoint(root: Path, base: Path, tokenizer, **lora_config) -> Path:
    """A LoRA checkpoint in our layout (meta.json + hf_adapter/) built with peft, without training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ckpt = root / "checkpoints" / "step-000001"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, lora_alpha=16, **lora_config))
    model.save_pretrained(ckpt / "hf_adapter")
    tokenizer.save_pretrained(ckpt / "hf_adapter")
    (ckpt / "meta.json").write_text(json.dumps({"step": 1, "world_size": 1, "peft": True}))
    (root / "checkpoints" / "last").symlink_to(ckpt.name)
    return ckpt

