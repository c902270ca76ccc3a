"""Fine-tune or pretrain any Hugging Face causal LM on the AutoModel path.

    recipe = finetune_recipe("Qwen/Qwen2.5-0.5B", dataset="data/train.jsonl", formatting="chat")
    run.run(recipe, direct=True)                                  # in this process
    run.run(recipe, executor=run.LocalExecutor(ntasks_per_node=2, launcher="torchrun"))

From the shell (`recipes/cli.py` has the override syntax, executors and sweeps):
    python recipes/hf_auto_model_for_causal_lm.py model.model_id=Qwen/Qwen2.5-0.5B trainer.max_steps=5 --yes
    nemo automodel finetune --factory hf_auto_model_for_causal_lm peft=None --dryrun
"""

from __future__ import annotations

from typing import Any

import nemo_run as run

from nemo_automodel import api
from nemo_automodel.checkpoint import AutoResume, ModelCheckpoint
from nemo_automodel.data import HFDatasetDataModule
from nemo_automodel.models import HFAutoModelForCausalLM
from nemo_automodel.parallel.strategy import FSDP2Strategy
from nemo_automodel.peft import LoRA
from nemo_automodel.trainer import NeMoLogger, Trainer
from recipes.optim import pytorch_adam_with_cosine_annealing, pytorch_adam_with_flat_lr

LORA_TARGETS = ["*_proj", "linear_qkv"]


def model(model_id: Any, torch_dtype: str = "float32", load_pretrained_weights: bool = True) -> run.Config:
    """The HF model node; ``model_id`` may itself be a node that yields a local folder."""
    return run.Config(HFAutoModelForCausalLM, model_id=model_id, torch_dtype=torch_dtype,
                      load_pretrained_weights=load_pretrained_weights)


@run.cli.factory(target=api.finetune, target_arg="peft", name="lora")
def lora(dim: int = 16, alpha: float = 32, target_modules: list[str] | None = None) -> run.Config:
    """LoRA on all attention and MLP projections (Megatron aliases resolve per architecture)."""
    return run.Config(LoRA, target_modules=target_modules or LORA_TARGETS, dim=dim, alpha=alpha)


@run.cli.factory(target=Trainer, target_arg="strategy", name="fsdp2_parallel")
def fsdp2_parallel(tensor_parallel_size: int = 1, context_parallel_size: int = 1,
                   data_parallel_size: int | None = None, expert_parallel_size: int = 1) -> run.Config:
    """``trainer.strategy="fsdp2_parallel(tensor_parallel_size=8)"``: FSDP2 on a (dp, cp, tp) mesh, with a
    mixture-of-experts model's experts split over ``expert_parallel_size`` ranks."""
    return run.Config(FSDP2Strategy, tensor_parallel_size=tensor_parallel_size,
                      context_parallel_size=context_parallel_size, data_parallel_size=data_parallel_size,
                      expert_parallel_size=expert_parallel_size)


def data(dataset: Any, formatting: str | None = "chat", seq_length: int = 512, micro_batch_size: int = 4,
         global_batch_size: int = 8, val_split: str | None = None, packed_sequence_size: int = 0,
         **kwargs: Any) -> run.Config:
    """A data node over a Hub name, local file, or a node that yields a `datasets.Dataset`."""
    return run.Config(HFDatasetDataModule, path_or_dataset=dataset, formatting=formatting, seq_length=seq_length,
                      micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                      val_split=val_split, packed_sequence_size=packed_sequence_size, **kwargs)


def trainer(max_steps: int = 100, num_nodes: int = 1, devices: int = 1, strategy: str | None = None,
            precision: str = "auto", val_check_interval: int | None = None, log_every_n_steps: int = 1) -> run.Config:
    return run.Config(Trainer, devices=devices, num_nodes=num_nodes, strategy=strategy, max_steps=max_steps,
                      precision=precision, gradient_clip_val=1.0, val_check_interval=val_check_interval,
                      log_every_n_steps=log_every_n_steps)


def peft_and_lr(peft_scheme: str | None) -> tuple[run.Config | None, float]:
    """The PEFT node and default learning rate of ``peft_scheme``: ``'lora'`` (1e-4) or None / ``'none'``
    for full SFT (1e-5)."""
    if peft_scheme not in ("lora", None, "none"):
        raise ValueError(f"peft_scheme={peft_scheme!r} is invalid: use 'lora' or None")
    return (lora(), 1e-4) if peft_scheme == "lora" else (None, 1e-5)


def logger(dir: str = "nemo_experiments", name: str = "finetune", every_n_train_steps: int | None = None) -> run.Config:
    return run.Config(NeMoLogger, log_dir=dir, name=name,
                      ckpt=run.Config(ModelCheckpoint, every_n_train_steps=every_n_train_steps))


@run.cli.factory(target=api.finetune, name="hf_auto_model_for_causal_lm")
def finetune_recipe(model_id: Any = "HuggingFaceTB/SmolLM2-135M-Instruct", dataset: Any = "rajpurkar/squad",
                    formatting: str | None = "squad", peft_scheme: str | None = "lora", dir: str = "nemo_experiments",
                    name: str = "finetune", num_nodes: int = 1, num_gpus_per_node: int = 1, max_steps: int = 100,
                    lr: float | None = None, seq_length: int = 512, micro_batch_size: int = 4,
                    global_batch_size: int = 8, strategy: str | None = None, precision: str = "auto",
                    preflight: bool = False) -> run.Partial:
    """LoRA (``peft_scheme='lora'``) or full SFT (``None``) of ``model_id`` on ``dataset``; ``preflight=True``
    checks and prints what the data trains on before any weights load (``nemo_automodel.data.preflight``)."""
    peft, default_lr = peft_and_lr(peft_scheme)
    return run.Partial(
        api.finetune,
        model=model(model_id),
        peft=peft,
        data=data(dataset, formatting, seq_length, micro_batch_size, global_batch_size),
        optim=pytorch_adam_with_flat_lr(lr=lr or default_lr),
        trainer=trainer(max_steps, num_nodes, num_gpus_per_node, strategy, precision),
        log=logger(dir, name),
        resume=run.Config(AutoResume, resume_if_exists=True),
        preflight=preflight,
    )


@run.cli.factory(target=api.finetune, name="hf_auto_model_for_causal_lm_megatron")
def megatron_finetune_recipe(model_id: Any = "HuggingFaceTB/SmolLM2-135M-Instruct", dataset: Any = "rajpurkar/squad",
                             formatting: str | None = "squad", peft_scheme: str | None = "lora",
                             tensor_parallel: int = 1, dir: str = "nemo_experiments", name: str = "finetune",
                             num_gpus_per_node: int = 1, max_steps: int = 100, lr: float | None = None,
                             seq_length: int = 512, micro_batch_size: int = 4, global_batch_size: int = 8) -> run.Partial:
    """`finetune_recipe` moved to Megatron-Core (same weights, optimizer, data): see nemo_automodel.megatron.swap."""
    from nemo_automodel.megatron.swap import to_megatron

    recipe = finetune_recipe(model_id=model_id, dataset=dataset, formatting=formatting, peft_scheme=peft_scheme,
                             dir=dir, name=name, num_gpus_per_node=num_gpus_per_node, max_steps=max_steps, lr=lr,
                             seq_length=seq_length, micro_batch_size=micro_batch_size,
                             global_batch_size=global_batch_size)
    return to_megatron(recipe, tensor_parallel=tensor_parallel)


@run.cli.factory(target=api.pretrain, name="hf_auto_model_for_causal_lm")
def pretrain_recipe(model_id: Any = "HuggingFaceTB/SmolLM2-135M", dataset: Any = "text.jsonl",
                    dir: str = "nemo_experiments", name: str = "pretrain", max_steps: int = 100,
                    lr: float = 3e-4, seq_length: int = 512, micro_batch_size: int = 4,
                    global_batch_size: int = 8) -> run.Partial:
    """Train from a random init on a ``text`` column, loss on every token, packed rows."""
    return run.Partial(
        api.pretrain,
        model=model(model_id, load_pretrained_weights=False),
        data=data(dataset, "text", seq_length, micro_batch_size, global_batch_size, packed_sequence_size=seq_length),
        optim=pytorch_adam_with_cosine_annealing(max_lr=lr, warmup_steps=max(1, max_steps // 10)),
        trainer=trainer(max_steps),
        log=logger(dir, name),
        resume=run.Config(AutoResume, resume_if_exists=True),
    )


if __name__ == "__main__":  # python recipes/hf_auto_model_for_causal_lm.py model.model_id=… --yes (see recipes/cli.py)
    from recipes.cli import main

    main(finetune_recipe)
