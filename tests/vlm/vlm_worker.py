"""One VLM training process for test_vlm_distributed.py: ``python vlm_worker.py SPEC.json`` (under torchrun or not).

SPEC holds ``{"runs": [run, ...]}``, trained one after another in this process. A run's keys:
  model, data, log_dir, name, steps     the tiny VLM folder, the image-chat JSONL, where and how long
  peft (bool), dropout (LoRA's, default 0.1), strategy (None|"ddp"|"fsdp2"), micro, global, lr, resume (AutoResume if a checkpoint exists)
  optim ("adamw"|"sgd")                 as in the text worker (tests/distributed/worker.py); "sgd" also writes out/init.pt
  out                                   folder for results: trainable.pt (rank 0: the full trainable weights)
                                        and sharded.json (rank 0: the modules fully_shard-ed, the tower and
                                        decoder prefixes, the blocks the model names)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from worker import _resume, optimizer, run_callbacks  # noqa: E402 - the text worker's choices

from nemo_automodel.api import finetune  # noqa: E402
from nemo_automodel.data import HFImageTextDataModule  # noqa: E402
from nemo_automodel.models import HFAutoModelForImageTextToText  # noqa: E402
from nemo_automodel.models.hf_vlm import language_model_prefix, vision_towers  # noqa: E402
from nemo_automodel.parallel.strategy import FSDP2Strategy  # noqa: E402
from nemo_automodel.peft import LoRA  # noqa: E402
from nemo_automodel.trainer import NeMoLogger, Trainer  # noqa: E402


class RecordingFSDP2(FSDP2Strategy):
    """FSDP2 that notes the blocks the model names before ``fully_shard`` renames their classes."""

    def wrap(self, model, mixed_precision=None):
        names = {id(m): n for n, m in model.model.named_modules()}
        self.blocks = [names[id(b)] for b in model.repeated_blocks()]
        return super().wrap(model, mixed_precision)


def fit(run: dict) -> tuple:
    model = HFAutoModelForImageTextToText(run["model"])
    data = HFImageTextDataModule(run["data"], seq_length=96, micro_batch_size=run["micro"],
                                 global_batch_size=run["global"], shuffle=True, seed=5)
    optim, clip = optimizer(run)
    strategy = RecordingFSDP2() if run.get("strategy") == "fsdp2" else run.get("strategy")
    trainer = Trainer(strategy=strategy, max_steps=run["steps"], log_every_n_steps=1,
                      gradient_clip_val=clip, enable_progress_bar=False, callbacks=run_callbacks(run),
                      precision="32")  # compared with one process to 1e-5
    # dropout > 0: a bitwise resume needs every rank's RNG restored
    peft = LoRA(target_modules=["*_proj"], dim=4, dropout=run.get("dropout", 0.1)) if run.get("peft") else None
    run_dir = finetune(model=model, data=data, trainer=trainer, peft=peft, optim=optim, resume=_resume(run),
                       log=NeMoLogger(log_dir=run["log_dir"], name=run["name"], tensorboard=False))
    return model, trainer, run_dir


def save_results(run: dict, model, trainer) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    module = model.model
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.strategy.rank != 0:
        return
    out = Path(run["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in full.items() if k in trainable}, out / "trainable.pt")
    (out / "sharded.json").write_text(json.dumps({
        "fsdp": [n for n, m in module.named_modules() if isinstance(m, FSDPModule)],
        "blocks": getattr(trainer.strategy, "blocks", None),
        "towers": list(vision_towers(module)), "decoder": language_model_prefix(module),
        "trainable": sorted(trainable)}))


def main(spec_path: str) -> None:
    torch.set_num_threads(1)  # tiny models on a shared CPU: one intra-op thread is fastest (torchrun sets it too)
    for run in json.loads(Path(spec_path).read_text())["runs"]:
        model, trainer, run_dir = fit(run)
        if run.get("out"):
            save_results(run, model, trainer)
        print(f"RUN_DIR {run_dir}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
