"""Shared by the Megatron tests and their torchrun worker: one small training run through `finetune`."""

from __future__ import annotations

from pathlib import Path

import torch

from nemo_automodel.api import finetune
from nemo_automodel.data import HFDatasetDataModule
from nemo_automodel.megatron import MegatronGPTModel, MegatronStrategy
from nemo_automodel.peft import LoRA
from nemo_automodel.trainer import NeMoLogger, Trainer
from nemo_automodel.trainer.optim import OptimizerModule

IDS = torch.arange(2 * 16).reshape(2, 16) * 37 % 509 + 3
STEPS = 4


def run_megatron(model_dir: str, data: str, log_dir: str, name: str, tp: int = 1, lora: bool = True) -> Path:
    import functools

    model = MegatronGPTModel(model_dir)
    data_module = HFDatasetDataModule(data, formatting=None, seq_length=64, micro_batch_size=2, global_batch_size=4,
                                      pad_token_id=0, seed=3)
    optim = OptimizerModule(functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.01))
    trainer = Trainer(strategy=MegatronStrategy(tensor_model_parallel_size=tp), max_steps=STEPS, log_every_n_steps=1,
                      gradient_clip_val=1.0, enable_progress_bar=False)
    peft = LoRA(target_modules=["*_proj", "linear_qkv"], dim=4) if lora else None
    run_dir = finetune(model=model, data=data_module, trainer=trainer, peft=peft, optim=optim,
                       log=NeMoLogger(log_dir=log_dir, name=name, tensorboard=False))
    trainer.strategy.teardown()
    return run_dir

