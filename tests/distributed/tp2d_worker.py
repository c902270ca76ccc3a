"""One process of the FSDP2+TP tests: ``python tp2d_worker.py SPEC.json`` (under torchrun or not).

SPEC ``{"runs": [run, ...]}``; a run's keys: model, data, log_dir, name, steps, total, micro, global, peft,
every (checkpoint interval), dp, tp, cp (FSDP2Strategy sizes; without tp one process trains with strategy=None),
accelerator (default "cpu"), resume, resume_from, out
(final.pt: full weights from rank 0), lr and optim (as in worker.py: "sgd" also writes out/init.pt) and
``logits`` (a list of model folders: save the TP logits of each probe, no training).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from worker import optimizer, run_callbacks  # the text worker's optimizer choice and callbacks

from nemo_automodel.api import finetune
from nemo_automodel.checkpoint import AutoResume, ModelCheckpoint
from nemo_automodel.data import HFDatasetDataModule
from nemo_automodel.models import HFAutoModelForCausalLM
from nemo_automodel.parallel.strategy import FSDP2Strategy
from nemo_automodel.peft import LoRA
from nemo_automodel.trainer import NeMoLogger, Trainer

IDS = torch.arange(2 * 24).reshape(2, 24) % 500


def strategy(run: dict):
    if "tp" not in run:
        return None
    return FSDP2Strategy(data_parallel_size=run["dp"], tensor_parallel_size=run["tp"],
                         context_parallel_size=run.get("cp", 1))


def logits(run: dict) -> None:
    """TP logits of each model in ``run['logits']`` (rank 0 saves them)."""
    s = strategy(run)
    s.setup("cpu")
    for i, path in enumerate(run["logits"]):
        model = HFAutoModelForCausalLM(path)
        model.configure_model("cpu")
        module = s.wrap(model)
        with torch.no_grad():
            out = module.eval()(input_ids=IDS, use_cache=False).logits
        if s.rank == 0:
            Path(run["out"]).mkdir(parents=True, exist_ok=True)
            torch.save(out, Path(run["out"]) / f"logits{i}.pt")


def fit(run: dict) -> None:
    model = HFAutoModelForCausalLM(run["model"])
    data = HFDatasetDataModule(run["data"], formatting=None, seq_length=64, micro_batch_size=run["micro"],
                               global_batch_size=run["global"], pad_token_id=0, seed=3)
    optim, clip = optimizer(run)
    trainer = Trainer(strategy=strategy(run), max_steps=run["steps"], log_every_n_steps=1, gradient_clip_val=clip,
                      enable_progress_bar=False, accelerator=run.get("accelerator", "cpu"), callbacks=run_callbacks(run),
                      precision=run.get("precision", "32"))  # fp32: compared with one process to 1e-5
    peft = LoRA(target_modules=["*_proj"], dim=4, dropout=0.0) if run.get("peft") else None
    resume = (AutoResume(resume_from_path=run["resume_from"]) if run.get("resume_from")
              else AutoResume(resume_if_exists=True) if run.get("resume") else None)
    finetune(model=model, data=data, trainer=trainer, peft=peft, optim=optim, resume=resume,
             log=NeMoLogger(log_dir=run["log_dir"], name=run["name"], ckpt=ModelCheckpoint(every_n_train_steps=run.get("every"), keep_last=3),
                            tensorboard=False))
    if run.get("out"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.strategy.rank == 0:
            Path(run["out"]).mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().clone() for k, v in full.items()}, Path(run["out"]) / "final.pt")


def main(spec_path: str) -> None:
    for run in json.loads(Path(spec_path).read_text())["runs"]:
        logits(run) if run.get("logits") else fit(run)


if __name__ == "__main__":
    main(sys.argv[1])
