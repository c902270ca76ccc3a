"""One rank of the tensor-parallel tests: ``torchrun --nproc_per_node 2 tp_worker.py SPEC.json``.

SPEC: ``{"model": folder, "out": folder, "data": jsonl, "log_dir": folder, "tp": 2}``. Writes (rank 0)
``logits.pt`` (full-vocabulary logits of fixed ids), ``state.pt`` (the gathered Megatron state) and
trains LoRA for a few steps with the trainer (run ``tp`` in ``log_dir``: metrics, adapter exported there), then
2 plain-SGD steps of the full model (run ``tp-sgd``: the HF model exported there).
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

warnings.filterwarnings("ignore")

from train_megatron import IDS, run_megatron  # noqa: E402

from nemo_automodel.megatron import MegatronGPTModel, MegatronStrategy  # noqa: E402


def main(spec: dict) -> None:
    strategy = MegatronStrategy(tensor_model_parallel_size=spec["tp"])
    strategy.setup("cpu")
    model = MegatronGPTModel(spec["model"])
    module = model.configure_model().eval()
    with torch.no_grad():
        logits = model.logits(module, {"input_ids": IDS})
    state = model.full_state_dict(module)
    if strategy.rank == 0:
        torch.save(logits, f"{spec['out']}/logits.pt")
        torch.save(state, f"{spec['out']}/state.pt")
    # the process group stays up: the trainer's MegatronStrategy rebuilds the model-parallel groups on it
    run_megatron(spec["model"], spec["data"], spec["log_dir"], "tp", tp=spec["tp"], lora=True, teardown=False)
    run_megatron(spec["model"], spec["data"], spec["log_dir"], "tp-sgd", tp=spec["tp"], lora=False, sgd=True)


if __name__ == "__main__":
    main(json.loads(open(sys.argv[1]).read()))
