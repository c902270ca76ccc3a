"""The recipe through NeMo-Run's Python API, ``run.run(recipe, executor=LocalExecutor(ntasks_per_node=2,
launcher="torchrun"))``, with FSDP2. DDP on the same executor is the recipe-file run checked in
tests/executors/test_executors_local.py (the session's ``local_ddp_run``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _chat_file(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}"},
                          {"role": "assistant", "content": " ".join(str(j) for j in range(1, i + 2))}]}
            for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_recipe_trains_on_two_torchrun_ranks_with_fsdp2(tiny_llama, tmp_path, monkeypatch):
    import nemo_run as run

    from recipes import hf_auto_model_for_causal_lm as hf

    strategy = "fsdp2"
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))
    recipe = hf.finetune_recipe(model_id=str(tiny_llama), dataset=str(_chat_file(tmp_path / "chat.jsonl")),
                                formatting="chat", dir=str(tmp_path / "runs"), name=strategy, max_steps=3,
                                seq_length=64, micro_batch_size=2, global_batch_size=4, strategy=strategy,
                                num_gpus_per_node=2)
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    executor = run.LocalExecutor(ntasks_per_node=2, launcher="torchrun", env_vars=env)
    run.run(recipe, executor=executor, name=f"tiny-{strategy}", detach=False)

    run_dir = tmp_path / "runs" / strategy
    meta = json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["world_size"] == 2 and meta["peft"] is True
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "last" / "hf_adapter" / "adapter_model.safetensors").is_file()
