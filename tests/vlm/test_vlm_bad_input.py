"""Bad VLM input fails with one line naming the cause, exit code 2, and nothing written: a row's image part
without an image, a missing or unreadable image file, the wrong model class for a checkpoint, a processor
without a chat template. Each case re-runs into the folder of an earlier good run, which must stay as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from nemo_automodel.launch.guard import run_graph
from recipes import hf_auto_model_for_causal_lm as causal_recipe
from recipes import hf_auto_model_for_image_text_to_text as vlm_recipe
from tests.vlm.test_vlm_recipes import write_image_chats

pytestmark = pytest.mark.slow
QUESTION = [{"type": "image"}, {"type": "text", "text": "What digit is this?"}]


def _rows(images: list[list[str]]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": QUESTION},
                          {"role": "assistant", "content": [{"type": "text", "text": str(i)}]}], "images": row}
            for i, row in enumerate(images)]


def _tree(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (folders too) with its file's SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _recipe(kind: str = "vlm", **kw):
    factory = causal_recipe if kind == "causal" else vlm_recipe
    recipe = factory.finetune_recipe(name="run", seq_length=64, micro_batch_size=2, global_batch_size=2, **kw)
    recipe.trainer.enable_progress_bar = False
    return recipe


@pytest.fixture(scope="module")
def case_root(tiny_vlm_dir, tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """A tiny VLM, its folder copied without a chat template, a tiny Llama, image chats (good and bad), and a
    finished one-step run in ``runs/run``."""
    root = tmp_path_factory.mktemp("vlm-bad-input")
    vlm = tiny_vlm_dir("qwen2_vl")
    good = write_image_chats(root)
    (root / "images" / "broken.png").write_text("not an image")
    no_template = shutil.copytree(vlm, root / "no-template")
    (no_template / "chat_template.jinja").unlink()
    for config in no_template.glob("*config.json"):
        values = json.loads(config.read_text())
        values.pop("chat_template", None)
        config.write_text(json.dumps(values))
    files = {"good": good, "vlm": vlm, "llama": tiny_llama, "no_template": no_template, "runs": root / "runs"}
    for name, images in (("no_image", [["images/0.png"], []]), ("missing", [["images/0.png"], ["images/nope.png"]]),
                         ("unreadable", [["images/broken.png"]])):
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in _rows(images)))
    run_graph(_recipe(model_id=str(vlm), dataset=str(good), dir=str(root / "runs"), max_steps=1))
    assert (root / "runs" / "run" / "checkpoints" / "last" / "hf_adapter").is_dir()
    return files


CASES = {  # (recipe kind, model key, data key, what the one line must say)
    "image-part-without-image": ("vlm", "vlm", "no_image", ["row 1, message 0", "an image part has no image"]),
    "image-path-missing": ("vlm", "vlm", "missing", ["row 1", "images/nope.png' does not exist"]),
    "image-unreadable": ("vlm", "vlm", "unreadable", ["row 0", "broken.png", "the image cannot be read"]),
    "text-model-as-vlm": ("vlm", "llama", "good", ["is a text-only model", "use llm.HFAutoModelForCausalLM("]),
    "vlm-as-causal-lm": ("causal", "vlm", "good",
                         ["is a vision-language model", "use llm.HFAutoModelForImageTextToText("]),
    "no-chat-template": ("vlm", "no_template", "good", ["no-template'", "has no chat template"]),
}


@pytest.mark.parametrize("kind,model,data,causes", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case_root, capsys, kind, model, data, causes):
    runs = case_root["runs"]
    before = _tree(runs)
    extra = {"formatting": "chat"} if kind == "causal" else {}
    recipe = _recipe(kind, model_id=str(case_root[model]), dataset=str(case_root[data]), dir=str(runs), max_steps=2,
                     **extra)
    with pytest.raises(SystemExit) as exit_:
        run_graph(recipe)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_.value.code == 2 and len(errors) == 1, err[-2000:]
    assert err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err
    assert all(cause in errors[0] for cause in causes), errors[0]
    assert _tree(runs) == before  # the earlier run untouched, no new checkpoint, metrics or run folder


def test_the_recipe_file_exits_2_with_one_line_and_no_run_folder(case_root, tmp_path):
    from tests.executors.cli_helpers import explain, run_cli

    proc = run_cli(f"model.model_id={case_root['vlm']}", f"data.path_or_dataset={case_root['missing']}",
                   "trainer.max_steps=2", "data.seq_length=64", "data.micro_batch_size=2",
                   "data.global_batch_size=2", f"log.log_dir={tmp_path / 'runs'}", "--yes",
                   script=Path(vlm_recipe.__file__), cwd=tmp_path)
    assert proc.returncode == 2, explain(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: row 1") and "does not exist" in last and "Traceback" not in proc.stderr, explain(proc)
    assert not (tmp_path / "runs").exists()
