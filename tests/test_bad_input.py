"""Bad input fails early with one line naming the cause, exit code 2, and no damage to earlier runs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.errors import ConfigError

SCRIPT = """
import sys, nemo_run as run
from nemo_automodel.launch.guard import run_graph
from recipes.hf_auto_model_for_causal_lm import finetune_recipe
kw = {kw}
recipe = finetune_recipe(model_id=kw.pop("model_id"), dataset=kw.pop("dataset"), formatting="chat", dir=kw.pop("dir"),
                         name="run", max_steps=2, seq_length=kw.pop("seq_length", 64), micro_batch_size=2,
                         global_batch_size=kw.pop("global_batch_size", 4))
if "warmup_steps" in kw:  # the recipe's LR is flat: swap in a warmup schedule
    from nemo_automodel.llm import adam
    recipe.optim = adam.pytorch_adam_with_cosine_annealing(warmup_steps=kw.pop("warmup_steps"))
for path, value in kw.items():
    *nodes, attr = path.split(".")
    node = recipe
    for name in nodes:
        node = getattr(node, name)
    setattr(node, attr, value)
run_graph(recipe)
"""


def _run(**kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", SCRIPT.format(kw=repr(kw))], capture_output=True, text=True,
                          env=env, timeout=300)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good_run(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    data = root / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
            for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = _run(model_id=str(tiny_llama), dataset=str(data), dir=str(root))
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(model_id=str(tiny_llama), dataset=str(data), dir=str(root))


CASES = {
    "model": (dict(model_id="/no/such/model"), "model_id='/no/such/model'"),
    "dataset": (dict(dataset="/no/such/data.jsonl"), "/no/such/data.jsonl"),
    "seq_length": (dict(seq_length=4), "seq_length"),
    "batch": (dict(global_batch_size=3), "global_batch_size"),
    "lora": ({"peft.target_modules": ["nothing_here"]}, "match no layer"),
    "empty-file": (dict(dataset="EMPTY"), "empty.jsonl' is empty"),
    "blank-file": (dict(dataset="BLANK"), "blank.jsonl' is empty"),
    "lr": ({"optim.optimizer_fn.lr": -1.0}, "lr=-1.0 is invalid: use a learning rate > 0"),
    "betas": ({"optim.optimizer_fn.betas": (0.9, 1.0)}, "betas=(0.9, 1.0) is invalid"),
    "eps": ({"optim.optimizer_fn.eps": 0.0}, "eps=0.0 is invalid"),
    "weight_decay": ({"optim.optimizer_fn.weight_decay": -0.1}, "weight_decay=-0.1 is invalid"),
    "warmup": ({"warmup_steps": 5}, "warmup_steps=5 is invalid: the run has only 2 steps"),
}


@pytest.mark.slow
@pytest.mark.parametrize("override,cause", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_and_leaves_previous_run_intact(good_run, override, cause):
    before = _digest(Path(good_run["dir"]) / "run" / "checkpoints")
    for name, text in (("EMPTY", ""), ("BLANK", "  \n\t\n")):  # empty and whitespace-only data files
        if override.get("dataset") == name:
            path = Path(good_run["dir"]) / f"{name.lower()}.jsonl"
            path.write_text(text)
            override = {**override, "dataset": str(path)}
    done = _run(**{**good_run, **override})
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and cause in last, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert _digest(Path(good_run["dir"]) / "run" / "checkpoints") == before


def test_trainer_rejects_unknown_strategy_and_precision():
    with pytest.raises(ConfigError, match=r"strategy='deepspeed' is invalid: use None, 'ddp', 'fsdp2'"):
        nl.Trainer(max_steps=1, strategy="deepspeed")
    with pytest.raises(ConfigError, match=r"precision='fp8' is invalid"):
        nl.Trainer(max_steps=1, precision="fp8")
    with pytest.raises(ConfigError, match="max_steps"):
        nl.Trainer()


def test_trainer_takes_any_structural_strategy_and_names_what_one_lacks():
    """``resolve_strategy`` asks for the ``contracts.Strategy`` members, not a base class."""
    from nemo_automodel.parallel import SingleDeviceStrategy

    class Delegating:  # derives from no strategy class: has every member through its own attributes
        def __init__(self) -> None:
            inner = SingleDeviceStrategy()
            for name in dir(inner):
                if not name.startswith("__"):
                    setattr(self, name, getattr(inner, name))

    own = Delegating()
    assert nl.Trainer(max_steps=1, strategy=own).strategy is own
    del own.barrier, own.wrap
    with pytest.raises(ConfigError, match=r"Delegating lacks Strategy\.barrier, wrap$"):
        nl.Trainer(max_steps=1, strategy=own)


def test_trainer_refuses_hookless_callbacks_and_unused_lightning_args():
    class Typo:
        def on_train_step_ends(self, trainer, step, metrics): ...

    with pytest.raises(ConfigError, match=r"callbacks\[1\]: Typo defines none of the hooks on_train_start"):
        nl.Trainer(max_steps=1, callbacks=[nl.Callback(), Typo()])
    with pytest.raises(ConfigError, match=r"logger=.* trackers go on the run's NeMoLogger"):
        nl.Trainer(max_steps=1, logger=nl.WandbLogger())
    with pytest.warns(UserWarning, match=r"num_sanity_val_steps=2\) is ignored"):
        nl.Trainer(max_steps=1, num_sanity_val_steps=2)
    with pytest.warns(UserWarning, match=r"use_distributed_sampler=False\) is ignored: the data module always splits"):
        nl.Trainer(max_steps=1, use_distributed_sampler=False)


def test_optimizer_and_schedule_values_are_refused_when_built():
    """What torch would refuse only after the model loaded is refused by the optimizer node's build."""
    import fiddle as fdl

    for kwargs, cause in [({"lr": 0.0}, "lr=0.0"), ({"betas": (-0.1, 0.9)}, "betas"), ({"eps": -1e-8}, "eps"),
                          ({"weight_decay": -1.0}, "weight_decay")]:
        graph = llm.adam.pytorch_adam_with_flat_lr()
        for key, value in kwargs.items():
            setattr(graph.optimizer_fn, key, value)
        with pytest.raises(ConfigError, match=cause):
            fdl.build(graph)
    with pytest.raises(ConfigError, match="warmup_steps=10 is invalid: the run has only 5 steps"):
        fdl.build(llm.adam.pytorch_adam_with_cosine_annealing(warmup_steps=10, max_steps=5))
    fdl.build(llm.adam.pytorch_adam_with_cosine_annealing(warmup_steps=5, max_steps=5))  # a warmup as long as the run


def test_empty_data_file_is_refused_when_the_data_module_is_built(tmp_path):
    for text in ("", " \n\n\t "):
        (tmp_path / "d.jsonl").write_text(text)
        with pytest.raises(ConfigError, match=r"data file '.*d.jsonl' is empty"):
            llm.HFDatasetDataModule(str(tmp_path / "d.jsonl"), formatting="chat")
        with pytest.raises(ConfigError, match="is empty"):
            llm.HFDatasetDataModule({"train": [str(tmp_path / "d.jsonl")]}, formatting="chat")


def test_constructors_validate_without_io():
    with pytest.raises(ConfigError, match="model_id"):
        llm.HFAutoModelForCausalLM()
    with pytest.raises(ConfigError, match=r"LoRA: dim=0 is invalid"):
        llm.peft.LoRA(dim=0)
    with pytest.raises(ConfigError, match="torch_dtype"):
        llm.HFAutoModelForCausalLM("some/model", torch_dtype="float8")
    llm.HFAutoModelForCausalLM("/definitely/not/there")  # lazy: nothing is read yet


def test_rerun_into_existing_run_dir_requires_resume(tiny_llama, tmp_path):
    from tests.helpers import chat_dataset

    def go(resume):
        return llm.api.finetune(
            model=llm.HFAutoModelForCausalLM(str(tiny_llama)), peft=llm.peft.LoRA(target_modules=["*_proj"]),
            data=llm.HFDatasetDataModule(chat_dataset(), formatting="chat", seq_length=64, micro_batch_size=4),
            trainer=nl.Trainer(max_steps=1, enable_progress_bar=False), log=nl.NeMoLogger(log_dir=str(tmp_path)),
            resume=resume)

    go(None)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        go(None)


def test_devices_other_than_the_launchers_count_is_logged_not_a_crash(monkeypatch, caplog, tmp_path, tiny_llama):
    """Under a launcher (WORLD_SIZE set) whose count differs from devices x num_nodes, the launcher's count wins
    with a log line. (That line once raised AttributeError: fit's ``log`` argument shadowed the module logger;
    mypy found it.) Here the strategy then refuses 2 processes, before anything loads."""
    import logging

    from tests.helpers import chat_dataset

    monkeypatch.setenv("WORLD_SIZE", "2")
    trainer = nl.Trainer(devices=4, max_steps=1, strategy="single", accelerator="cpu", enable_progress_bar=False)
    data = llm.HFDatasetDataModule(chat_dataset(), formatting="chat", seq_length=32, micro_batch_size=1)
    with caplog.at_level(logging.INFO, logger="nemo_automodel.trainer.trainer"), \
            pytest.raises(ConfigError, match="strategy='single' cannot train on 2 processes"):
        trainer.fit(llm.HFAutoModelForCausalLM(str(tiny_llama)), data, log=nl.NeMoLogger(log_dir=str(tmp_path)))
    assert "devices=4 x num_nodes=1 differs from the launcher's WORLD_SIZE=2" in caplog.text
