"""Recipes are lazy Fiddle graphs: building does no I/O; run.run trains directly and via LocalExecutor."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nemo_run as run
import pytest

from recipes import hf_auto_model_for_causal_lm as hf_recipe
from recipes import smollm2_135m


def _chat_file(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Repeat {i}"}, {"role": "assistant", "content": f"{i} {i}"}]}
            for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_building_recipes_does_no_io(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_AUTOMODEL_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    recipe = hf_recipe.finetune_recipe(model_id="/not/there", dataset="/not/there.jsonl")
    demo = smollm2_135m.finetune_recipe()
    assert time.perf_counter() - start < 1.0
    assert not (tmp_path / "cache").exists()  # the embedded model is converted only when built
    assert recipe.model.model_id == "/not/there" and recipe.peft.dim == 16
    assert demo.optim.optimizer_fn.lr == 1e-3 and demo.data.formatting == "chat"
    assert demo.preflight is True and recipe.preflight is False  # `make demo` prints the data preflight
    sft = hf_recipe.finetune_recipe(peft_scheme=None)
    assert sft.peft is None and sft.optim.optimizer_fn.lr == 1e-5


def _tiny_recipe(model_dir, tmp_path, name, **kwargs):
    return hf_recipe.finetune_recipe(model_id=str(model_dir), dataset=str(_chat_file(tmp_path / "chat.jsonl")),
                                     formatting="chat", dir=str(tmp_path / "runs"), name=name, max_steps=3,
                                     seq_length=64, micro_batch_size=2, global_batch_size=4, **kwargs)


def test_run_direct_trains_after_its_preflight(tiny_llama, tmp_path, capsys):
    run.run(_tiny_recipe(tiny_llama, tmp_path, "direct", preflight=True), direct=True)
    meta = json.loads((tmp_path / "runs" / "direct" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["peft"] is True
    out = capsys.readouterr().out
    assert "== data preflight ==" in out and "rows: 16 in, 16 trained on" in out


@pytest.mark.slow
def test_run_with_local_executor_trains(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))
    venv_bin = str(Path(sys.executable).parent)
    env = {"PATH": f"{venv_bin}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    run.run(_tiny_recipe(tiny_llama, tmp_path, "local"), executor=run.LocalExecutor(env_vars=env),
            name="tiny-local", detach=False)
    meta = json.loads((tmp_path / "runs" / "local" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 3
