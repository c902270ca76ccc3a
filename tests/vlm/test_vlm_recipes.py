"""The VLM recipe as a lazy graph: no I/O to build, CLI overrides and sweeps land in it, `nemo automodel` resolves
it, the Megatron swap refuses it, and one real CLI run trains a tiny VLM on image paths from a JSONL."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from recipes import hf_auto_model_for_image_text_to_text as vlm_recipe
from recipes.cli import main
from tests.helpers import recorded_io

FACTORY = "hf_auto_model_for_image_text_to_text"
PROCESSOR_FILES = ("processor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json")


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``recipes/hf_auto_model_for_image_text_to_text.py ARGS`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{FACTORY}.py", *args])
    try:
        main(vlm_recipe.finetune_recipe)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def nemorun_home(tmp_path, monkeypatch) -> Path:
    """A private NEMORUN_HOME: a sweep's dryrun builds an experiment there."""
    from nemo_run.config import get_nemorun_home, set_nemorun_home

    home, previous = tmp_path / "nemorun", get_nemorun_home()
    set_nemorun_home(str(home))
    monkeypatch.setenv("NEMORUN_HOME", str(home))
    yield home
    set_nemorun_home(previous)


def write_image_chats(folder: Path, n: int = 4) -> Path:
    """``folder/chat.jsonl``: ``n`` "What digit is this?" chats whose images are PNGs given by relative path."""
    import numpy as np
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pixels = np.random.RandomState(i).randint(0, 64, size=(28, 28, 3)).astype("uint8")
        pixels[4:24, 2 + 5 * i: 6 + 5 * i] = 255
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": str(i)}]}], "images": [f"images/{i}.png"]})
    path = folder / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_building_the_recipe_does_no_io(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with recorded_io() as events:  # no file opened, folder listed, process started or socket used
        recipe = vlm_recipe.finetune_recipe(model_id="/not/there", dataset="/not/there.jsonl")
        sft = vlm_recipe.finetune_recipe(model_id="no/such-vlm", peft_scheme=None)
    assert events == []
    assert list(tmp_path.iterdir()) == []  # nothing loaded, downloaded or written
    assert recipe.model.model_id == "/not/there" and recipe.model.freeze_vision_tower is True
    assert recipe.data.path_or_dataset == "/not/there.jsonl" and recipe.peft.dim == 16
    assert sft.peft is None and sft.optim.optimizer_fn.lr == 1e-5 and recipe.optim.optimizer_fn.lr == 1e-4
    with pytest.raises(ValueError, match="peft_scheme='qlora' is invalid"):
        vlm_recipe.finetune_recipe(peft_scheme="qlora")


def test_dryrun_prints_the_overridden_graph(monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "model.model_id=/models/vlm", "model.freeze_vision_tower=False",
                         "peft=None", "trainer.max_steps=3", "data.seq_length=96", "data.images_column=pics",
                         "data.image_root=/data/img", "--dryrun")
    assert code == 0, err
    assert "HFAutoModelForImageTextToText(" in out and "HFImageTextDataModule(" in out
    for shown in ("model_id='/models/vlm'", "freeze_vision_tower=False", "max_steps=3", "seq_length=96",
                  "images_column='pics'", "image_root='/data/img'"):
        assert shown in out, shown
    assert "LoRA(" not in out


def test_sweep_dryrun_has_one_task_per_value(monkeypatch, capsys, nemorun_home):
    code, out, err = cli(monkeypatch, capsys, "peft.dim=[4,8]", "--dryrun")
    assert code == 0, err
    assert "sweep of 2 tasks" in out
    for name in ("dim-4", "dim-8"):
        assert f"finetune_vlm-{name}" in out  # each task writes to its own run dir


def test_megatron_swap_refuses_a_vlm_recipe_in_one_line():
    from nemo_automodel.errors import ConfigError
    from nemo_automodel.megatron.swap import to_megatron

    recipe = vlm_recipe.finetune_recipe(model_id="/not/there")
    before = repr(recipe)
    with pytest.raises(ConfigError, match=r"vision-language .* no Megatron-Core .*keep the recipe on the AutoModel "
                                          r"path") as err:
        to_megatron(recipe, tensor_parallel=2)
    assert "\n" not in str(err.value)
    assert repr(recipe) == before  # the input graph is untouched


@pytest.mark.slow
def test_the_nemo_command_resolves_the_vlm_factory(tmp_path):
    from tests.executors.cli_helpers import explain, run_cli

    nemo = [str(Path(sys.executable).parent / "nemo"), "automodel", "finetune"]
    proc = run_cli("--factory", FACTORY, "model.model_id=/not/there", "peft.dim=4", "trainer.max_steps=3",
                   "--dryrun", exe=nemo, cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert "HFAutoModelForImageTextToText(" in proc.stdout and "dim=4" in proc.stdout and "max_steps=3" in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_run_trains_on_image_paths_and_saves_adapter_with_processor(monkeypatch, capsys, tiny_vlm_dir,
                                                                        tmp_path):
    from safetensors.torch import load_file

    from nemo_automodel.models.processor import has_chat_template, load_processor

    data = write_image_chats(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # relative image paths resolve against the JSONL's folder, not the cwd
    code, _, err = cli(monkeypatch, capsys, f"model.model_id={tiny_vlm_dir('qwen2_vl')}",
                       f"data.path_or_dataset={data}", "trainer.max_steps=3", "trainer.enable_progress_bar=False",
                       "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=2",
                       "optim.optimizer_fn.lr=1e-2", f"log.log_dir={tmp_path / 'runs'}", "log.name=vlm", "--yes")
    assert code == 0, err
    last = tmp_path / "runs" / "vlm" / "checkpoints" / "last"
    assert json.loads((last / "meta.json").read_text())["step"] == 3
    adapter = last / "hf_adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", *PROCESSOR_FILES):
        assert (adapter / name).is_file(), name
    tensors = load_file(adapter / "adapter_model.safetensors")
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    assert lora_b and all(".visual." not in k for k in tensors)  # LoRA on the language model only
    assert any(bool(t.abs().sum() > 0) for t in lora_b)  # lora_B starts at zero: the steps trained it
    processor = load_processor(str(adapter))
    assert has_chat_template(processor) and processor.image_processor is not None


def test_preflight_refuses_image_text_data_in_one_line(tmp_path):
    """The data preflight reads text data modules; with image chats it says so before anything loads."""
    import fiddle as fdl

    from nemo_automodel.errors import ConfigError

    recipe = vlm_recipe.finetune_recipe(model_id=str(tmp_path / "no-model"), dataset=str(tmp_path / "no-data"),
                                        dir=str(tmp_path / "runs"))
    recipe.preflight = True
    with pytest.raises(ConfigError, match=r"preflight=True checks text data modules .*HFImageTextDataModule"):
        fdl.build(recipe)()
    assert not (tmp_path / "runs").exists()
