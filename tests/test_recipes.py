"""Recipes are lazy Fiddle graphs: building does no I/O; run.run trains directly and via LocalExecutor."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nemo_run as run
import pytest

from recipes import hf_auto_model_for_causal_lm as hf_recipe
from recipes import smollm2_135m
from tests.helpers import QA, metrics, recorded_io, train_losses


def _chat_file(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Repeat {i}"}, {"role": "assistant", "content": f"{i} {i}"}]}
            for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_building_recipes_does_no_io(tmp_path, monkeypatch):
    """No file is opened (the model id, the dataset, the cache), no folder listed, no process or socket used."""
    monkeypatch.setenv("NEMO_AUTOMODEL_CACHE", str(tmp_path / "cache"))
    with recorded_io() as events:
        recipe = hf_recipe.finetune_recipe(model_id="/not/there", dataset="/not/there.jsonl")
        demo = smollm2_135m.finetune_recipe()
    assert events == []
    assert not (tmp_path / "cache").exists()  # the embedded model is converted only when built
    with recorded_io() as events, pytest.raises(FileNotFoundError):  # the recorder sees a read
        open("/not/there.jsonl")
    assert events == [("open", "/not/there.jsonl")]
    assert recipe.model.model_id == "/not/there" and recipe.peft.dim == 16
    assert demo.optim.optimizer_fn.lr == 1e-3 and demo.data.formatting == "chat"
    assert demo.preflight is True and recipe.preflight is False  # `make demo` prints the data preflight
    sft = hf_recipe.finetune_recipe(peft_scheme=None)
    assert sft.peft is None and sft.optim.optimizer_fn.lr == 1e-5


def test_optimizer_nodes_come_from_recipes_and_old_names_still_import():
    """The recipes' optimizer nodes are ``recipes.optim``'s, re-exported by the NeMo facade ``llm.adam``; the
    class they build is `PytorchOptimizerModule`, and its old name warns."""
    import fiddle as fdl

    from nemo_automodel.llm import adam
    from nemo_automodel.trainer import optim
    from recipes import optim as recipe_optim

    assert adam.pytorch_adam_with_flat_lr is recipe_optim.pytorch_adam_with_flat_lr
    assert adam.pytorch_adam_with_cosine_annealing is recipe_optim.pytorch_adam_with_cosine_annealing
    built = fdl.build(hf_recipe.pretrain_recipe().optim)
    assert type(built) is optim.PytorchOptimizerModule and built.lr_scheduler.min_lr == pytest.approx(3e-5)
    with pytest.warns(DeprecationWarning, match="use nemo_automodel.trainer.optim.PytorchOptimizerModule"):
        assert optim.OptimizerModule is optim.PytorchOptimizerModule
    with pytest.raises(AttributeError):
        optim.NoSuchName  # noqa: B018


def _tiny_recipe(model_dir, tmp_path, name, **kwargs):
    return hf_recipe.finetune_recipe(model_id=str(model_dir), dataset=str(_chat_file(tmp_path / "chat.jsonl")),
                                     formatting="chat", dir=str(tmp_path / "runs"), name=name, max_steps=3,
                                     seq_length=64, micro_batch_size=2, global_batch_size=4, **kwargs)


def _assert_loss_fell(run_dir: Path) -> None:
    """At lr 1e-2 three LoRA steps lower the loss (~0.2 after two) far more than batches differ at the start
    (~0.03, the change at the recipe's lr 1e-4)."""
    losses = train_losses(run_dir)
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.1, losses


def test_run_direct_trains_after_its_preflight(tiny_llama, tmp_path, capsys):
    run.run(_tiny_recipe(tiny_llama, tmp_path, "direct", preflight=True, lr=1e-2), direct=True)
    meta = json.loads((tmp_path / "runs" / "direct" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["peft"] is True
    _assert_loss_fell(tmp_path / "runs" / "direct")
    out = capsys.readouterr().out
    assert "== data preflight ==" in out and "rows: 16 in, 16 trained on" in out


def test_pretrain_recipe_trains_every_weight_on_every_token(tiny_llama, tokenizer, tmp_path):
    """The pretrain recipe packs the corpus (8 sentences, 109 tokens: two 64-token rows, one global batch of 2) and
    puts the loss on every token but the first of each document; all weights and their Adam state are trained,
    from a random init, and the loss falls on the repeated batch."""
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM

    texts = [f"{q} {a}" for q, a in QA]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    recipe = hf_recipe.pretrain_recipe(model_id=str(tiny_llama), dataset=str(tmp_path / "text.jsonl"),
                                       dir=str(tmp_path / "runs"), max_steps=4, lr=1e-2, seq_length=64,
                                       micro_batch_size=2, global_batch_size=2)
    assert recipe.model.load_pretrained_weights is False and "peft" not in recipe.__arguments__
    run.run(recipe, direct=True)
    run_dir = tmp_path / "runs" / "pretrain"
    targets = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)  # + EOS, - BOS
    assert targets <= 2 * 64 and [m["loss_tokens"] for m in metrics(run_dir)] == [targets] * 4
    losses = train_losses(run_dir)
    assert losses[-1] < losses[0] - 0.5, losses
    last = run_dir / "checkpoints" / "last"
    assert json.loads((last / "meta.json").read_text())["peft"] is False and not (last / "hf_adapter").exists()
    model = AutoModelForCausalLM.from_pretrained(last / "model")
    saved = set(FileSystemReader(str(last / "state")).read_metadata().state_dict_metadata)
    assert {k.removeprefix("model.") for k in saved if k.startswith("model.")} == set(model.state_dict())  # trainable
    assert {f"optim.state.{n}.exp_avg" for n, _ in model.named_parameters()} <= saved  # (tied lm_head: one entry)


@pytest.mark.slow
def test_run_with_local_executor_trains(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))
    venv_bin = str(Path(sys.executable).parent)
    env = {"PATH": f"{venv_bin}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    run.run(_tiny_recipe(tiny_llama, tmp_path, "local", lr=1e-2), executor=run.LocalExecutor(env_vars=env),
            name="tiny-local", detach=False)
    meta = json.loads((tmp_path / "runs" / "local" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 3
    _assert_loss_fell(tmp_path / "runs" / "local")
