"""One training process for the distributed tests: ``python worker.py SPEC.json`` (under torchrun or not).

SPEC holds ``{"runs": [run, ...]}``; the runs train one after another in this process (so one
torchrun start serves several fits). A run's keys:
  model, data, log_dir, name, steps            where and how long
  peft (False|True|"dora"), dropout (LoRA's, default 0.1)
  strategy (None|"ddp"|"fsdp2"|{FSDP2Strategy kwargs}), devices   (Trainer(devices=N) launches the workers)
  targets                                      LoRA target_modules (default ["*_proj"])
  micro, global, lr, total                     batch sizes, AdamW with cosine LR over ``total`` steps
  optim ("adamw"|"sgd")                        "sgd": plain SGD at a flat LR, no clipping (see ``optimizer``),
                                               and out/init.pt (rank 0: the full weights the training starts from)
  every, resume, resume_from                   checkpoint interval, AutoResume(if exists | from a path)
  out                                          folder for results: final.pt (rank 0, full weights),
                                               rank{r}.pt (each rank's weights), logits.pt, syncs.json
  activation_checkpointing, chunked_loss,      HFAutoModelForCausalLM / Trainer options (default off, "32")
  precision
  collective_timeout                           Trainer option (seconds, default 600)
  kill_in_save_at, kill_point                  SIGKILL this process while it writes checkpoint N, at
                                               kill_point dcp | export (default) | rename | last
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path

import torch

# Plain components (no nemo_run / fiddle import): start-up time counts, every test starts processes.
from nemo_automodel.api import finetune
from nemo_automodel.checkpoint import AutoResume, ModelCheckpoint
from nemo_automodel.data import HFDatasetDataModule
from nemo_automodel.models import HFAutoModelForCausalLM
from nemo_automodel.parallel import FSDP2Strategy
from nemo_automodel.peft import DoRA, LoRA
from nemo_automodel.trainer import NeMoLogger, Trainer
from nemo_automodel.trainer.optim import PytorchOptimizerModule, WarmupCosineSchedule

IDS = torch.arange(2 * 24).reshape(2, 24) % 500  # fixed probe inputs for the logits check


def optimizer(run: dict) -> tuple[PytorchOptimizerModule, float | None]:
    """The run's optimizer and gradient clipping: AdamW (weight decay 0.01, warmup 2 + cosine to 1e-4 over
    ``total`` steps) clipped at 1.0, or (``optim="sgd"``) plain SGD at a flat LR, unclipped: its update is
    linear in the gradient, so a wrong gradient scale shows in the weights (AdamW and clipping hide it)."""
    lr = run.get("lr", 1e-2)
    if run.get("optim") == "sgd":
        return PytorchOptimizerModule(functools.partial(torch.optim.SGD, lr=lr)), None
    # = llm.adam.pytorch_adam_with_cosine_annealing(max_lr=lr, warmup_steps=2, min_lr=1e-4), built
    return PytorchOptimizerModule(functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.01),
                           WarmupCosineSchedule(warmup_steps=run.get("warmup", 2), min_lr=1e-4,
                                                max_steps=run.get("total", run["steps"]))), 1.0


class InitialWeights:
    """Saves the full weights the training starts from (rank 0: ``out/init.pt``)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer, module) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.strategy.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().clone() for k, v in full.items()}, self.out / "init.pt")


def run_callbacks(run: dict) -> list:
    """SyncCounter (``count_syncs``) and, for an SGD run with ``out``, InitialWeights."""
    found = [SyncCounter()] if run.get("count_syncs") else []
    return found + ([InitialWeights(run["out"])] if run.get("optim") == "sgd" and run.get("out") else [])


class SyncCounter:
    """Counts DDP gradient all-reduces and records which micro-batch (1-based forward count) ran them."""

    def __init__(self) -> None:
        self.forwards, self.at = 0, []

    def on_train_start(self, trainer, module) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        module.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))

        def hook(state, bucket):
            self.at.append(self.forwards)
            return allreduce_hook(state, bucket)

        module.register_comm_hook(None, hook)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_save(step: int, point: str) -> None:
    """SIGKILL this process at ``point`` of writing checkpoint ``step``: mid-way through the DCP state
    (``dcp``: after its first tensor hit the file), in the HF export (``export``: state complete),
    just before the folder's rename (``rename``: meta.json written) or before ``last`` moves (``last``)."""
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.filesystem as dcp_fs

    from nemo_automodel.checkpoint import save_load as checkpoint

    ours = f"step-{step:06d}"
    if point == "dcp":
        real_save, real_item, armed = dcp.save, dcp_fs._write_item, []

        def save(state, *args, checkpoint_id=None, **kw):
            if checkpoint_id and ours in str(checkpoint_id):
                armed.append(True)
            return real_save(state, *args, checkpoint_id=checkpoint_id, **kw)

        def write_item(*args, **kw):
            result = real_item(*args, **kw)
            if armed:
                _die()
            return result

        dcp.save, dcp_fs._write_item = save, write_item
    elif point == "export":
        real_export = HFAutoModelForCausalLM.save_hf

        def save_hf(self, out, **kw):
            if Path(out).name.endswith(ours):  # the DCP state of this step is written by now
                _die()
            return real_export(self, out, **kw)

        HFAutoModelForCausalLM.save_hf = save_hf
    elif point == "rename":
        real_replace = checkpoint.os.replace

        def replace(src, dst, *args, **kw):
            if Path(src).name == f"{checkpoint.TMP_PREFIX}{ours}":
                _die()
            return real_replace(src, dst, *args, **kw)

        checkpoint.os.replace = replace
    elif point == "last":
        real_point = checkpoint._point_last

        def point_last(root, target):
            if Path(target).name == ours:
                _die()
            return real_point(root, target)

        checkpoint._point_last = point_last
    else:
        raise ValueError(point)


def fit(run: dict, callbacks: list) -> tuple:
    model = HFAutoModelForCausalLM(run["model"], activation_checkpointing=run.get("activation_checkpointing", False),
                                   chunked_loss=run.get("chunked_loss", False))
    data = HFDatasetDataModule(run["data"], formatting=None, seq_length=64, micro_batch_size=run["micro"],
                               global_batch_size=run["global"], pad_token_id=0, seed=3)
    optim, clip = optimizer(run)
    strategy = run.get("strategy")
    strategy = FSDP2Strategy(**strategy) if isinstance(strategy, dict) else strategy
    trainer = Trainer(devices=run.get("devices", 1), strategy=strategy, max_steps=run["steps"],
                      log_every_n_steps=1, gradient_clip_val=clip, enable_progress_bar=False, callbacks=callbacks,
                      precision=run.get("precision", "32"), collective_timeout=run.get("collective_timeout", 600))
    # dropout > 0: resuming bitwise needs every rank's RNG restored
    method = DoRA if run.get("peft") == "dora" else LoRA
    peft = method(target_modules=run.get("targets", ["*_proj"]), dim=4, dropout=run.get("dropout", 0.1)) \
        if run.get("peft") else None
    ckpt = ModelCheckpoint(every_n_train_steps=run.get("every"), keep_last=2)
    run_dir = finetune(model=model, data=data, trainer=trainer, peft=peft, optim=optim, resume=_resume(run),
                       log=NeMoLogger(log_dir=run["log_dir"], name=run["name"], ckpt=ckpt, tensorboard=False))
    return model, trainer, run_dir


def _resume(run: dict):
    if run.get("resume_from"):
        return AutoResume(resume_from_path=run["resume_from"])
    return AutoResume(resume_if_exists=True) if run.get("resume") else None


def save_results(run: dict, model, trainer, callbacks: list) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out = Path(run["out"])
    out.mkdir(parents=True, exist_ok=True)
    rank = trainer.strategy.rank
    full = get_model_state_dict(model.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if run.get("per_rank"):
        local = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.model.state_dict().items()}
        torch.save(local, out / f"rank{rank}.pt")
    with torch.no_grad():
        logits = model.model.eval()(input_ids=IDS, use_cache=False).logits  # no LoRA dropout
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in full.items()}, out / "final.pt")
        torch.save(logits, out / "logits.pt")
    for cb in callbacks:
        if isinstance(cb, SyncCounter):
            (out / f"syncs-rank{rank}.json").write_text(json.dumps({"forwards": cb.forwards, "at": cb.at}))


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    for run in spec["runs"]:
        if run.get("kill_in_save_at"):
            _kill_in_save(run["kill_in_save_at"], run.get("kill_point", "export"))
        callbacks = run_callbacks(run)
        model, trainer, run_dir = fit(run, callbacks)
        if run.get("out") and not run.get("devices", 1) > 1:
            save_results(run, model, trainer, callbacks)
        print(f"RUN_DIR {run_dir}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
