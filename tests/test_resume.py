"""Single-process resume: stopping at step k and resuming reaches the uninterrupted run's weights."""

from __future__ import annotations

import json

import fiddle as fdl
import pytest
import torch

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from tests.helpers import chat_dataset


def _run(model_path, log_dir, steps, peft, resume=True):
    model = llm.HFAutoModelForCausalLM(str(model_path))
    llm.api.finetune(
        model=model, peft=peft,
        data=llm.HFDatasetDataModule(chat_dataset(repeat=1), formatting="chat", seq_length=64, micro_batch_size=2,
                                     global_batch_size=4, seed=7),
        optim=fdl.build(llm.adam.pytorch_adam_with_cosine_annealing(max_lr=1e-2, warmup_steps=2, max_steps=5)),
        trainer=nl.Trainer(max_steps=steps, enable_progress_bar=False),
        log=nl.NeMoLogger(log_dir=str(log_dir), name="run"),
        resume=nl.AutoResume(resume_if_exists=True) if resume else None,
    )
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "sft"])
def test_stop_and_resume_equals_uninterrupted(tiny_llama, tmp_path, lora):
    # LoRA dropout > 0: the resumed run must restore the RNG to replay the same masks
    peft = (lambda: llm.peft.LoRA(target_modules=["*_proj"], dim=4, dropout=0.1)) if lora else (lambda: None)
    # 5 steps cross an epoch boundary (8 rows / global batch 4 = 2 steps per epoch).
    full = _run(tiny_llama, tmp_path / "full", 5, peft())
    _run(tiny_llama, tmp_path / "split", 2, peft())
    resumed = _run(tiny_llama, tmp_path / "split", 5, peft())
    meta = json.loads((tmp_path / "split" / "run" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["resumed_from"] == 2  # the second process started at step 3
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key  # bitwise on CPU fp32
