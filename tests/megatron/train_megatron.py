"""Shared by the Megatron tests and their torchrun worker: one small training run through `finetune`."""

from __future__ import annotations

from pathlib import Path

import torch

from nemo_automodel.api import finetune
from nemo_automodel.data import HFDatasetDataModule
from nemo_automodel.megatron import MegatronGPTModel, MegatronOptimizerModule, MegatronStrategy
from nemo_automodel.peft import LoRA
from nemo_automodel.trainer import NeMoLogger, Trainer
from nemo_automodel.trainer.optim import PytorchOptimizerModule

IDS = torch.arange(2 * 16).reshape(2, 16) * 37 % 509 + 3
STEPS = 4


def run_megatron(model_dir: str, data: str, log_dir: str, name: str, tp: int = 1, lora: bool = True,
                 sgd: bool = False, teardown: bool = True) -> Path:
    """STEPS AdamW steps, or (``sgd``) 2 steps of plain SGD: Megatron's ``OptimizerConfig(optimizer="sgd")``
    without momentum, weight decay or clipping, whose update is linear in the gradient. ``teardown=False``
    keeps the process group for another run in this process (torchrun's cannot be joined twice)."""
    import functools

    from megatron.core.optimizer import OptimizerConfig

    model = MegatronGPTModel(model_dir)
    data_module = HFDatasetDataModule(data, formatting=None, seq_length=64, micro_batch_size=2, global_batch_size=4,
                                      pad_token_id=0, seed=3)
    optim = (MegatronOptimizerModule(OptimizerConfig(optimizer="sgd", lr=1.0, sgd_momentum=0.0, weight_decay=0.0,
                                                     clip_grad=0.0)) if sgd
             else PytorchOptimizerModule(functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)))
    trainer = Trainer(strategy=MegatronStrategy(tensor_model_parallel_size=tp), max_steps=2 if sgd else STEPS,
                      log_every_n_steps=1, gradient_clip_val=None if sgd else 1.0, enable_progress_bar=False,
                      precision="32")  # compared with the HF path in fp32
    peft = LoRA(target_modules=["*_proj", "linear_qkv"], dim=4) if lora else None
    run_dir = finetune(model=model, data=data_module, trainer=trainer, peft=peft, optim=optim,
                       log=NeMoLogger(log_dir=log_dir, name=name, tensorboard=False))
    if teardown:
        trainer.strategy.teardown()
    return run_dir

