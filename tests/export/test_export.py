"""Export without vLLM: checkpoint resolution, export layouts, and one-line errors before vLLM starts."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from export_support import lora_checkpoint

from nemo_automodel import llm
from nemo_automodel.errors import ConfigError
from nemo_automodel.export import export, generate, read_export, resolve_checkpoint


def sft_checkpoint(root: Path, model_dir: Path, step: int = 1) -> Path:
    """A full-SFT checkpoint in our layout whose model/ is ``model_dir``."""
    ckpt = root / "checkpoints" / f"step-{step:06d}"
    shutil.copytree(model_dir, ckpt / "model")
    (ckpt / "meta.json").write_text(json.dumps({"step": step, "world_size": 1, "peft": False}))
    last = root / "checkpoints" / "last"
    last.unlink(missing_ok=True)
    last.symlink_to(ckpt.name)
    return ckpt


@pytest.fixture
def no_vllm(monkeypatch):
    """Fail the test if anything tries to start a process (the vLLM venv's python)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def test_llm_api_export_is_exposed():
    assert llm.api.export is export


def test_checkpoint_resolves_from_run_dir_last_and_step(tmp_path, tiny_llama):
    ckpt = sft_checkpoint(tmp_path / "run", tiny_llama, step=3)
    sft_checkpoint(tmp_path / "run", tiny_llama, step=5)  # newer: `last` points here now
    newest = (tmp_path / "run" / "checkpoints" / "step-000005").resolve()
    for given in ("run", "run/checkpoints", "run/checkpoints/last"):
        assert resolve_checkpoint(tmp_path / given) == newest
    assert resolve_checkpoint(ckpt) == ckpt.resolve()


def test_full_sft_export_layout(tmp_path, tiny_llama):
    out = export(sft_checkpoint(tmp_path / "run", tiny_llama), tmp_path / "export")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "nemo_export.json"} <= names
    manifest = read_export(out)
    assert manifest["mode"] == "merged" and manifest["model"] == str(out)
    assert export(tmp_path / "run", out) == out  # re-exporting over an export replaces it


def test_adapter_export_layout(tmp_path, tiny_llama, tokenizer):
    lora_checkpoint(tmp_path / "run", tiny_llama, tokenizer, target_modules=["q_proj", "v_proj"])
    out = export(tmp_path / "run", tmp_path / "export", mode="adapter")
    manifest = read_export(out)
    assert manifest["mode"] == "adapter" and manifest["max_lora_rank"] == 8 and manifest["lora_name"] == "export"
    assert manifest["model"] == str(Path(tiny_llama).resolve())
    assert len(manifest["lora_modules"]) == 2 * 2  # q_proj + v_proj in 2 layers
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == manifest["model"]
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("damage, message", [
    ("no_meta", r"is incomplete \(no meta.json\)"),
    ("no_model", r"full fine-tuning checkpoint but model/ lacks config.json"),
    ("no_last", r"has no complete checkpoint \('last' is missing"),
    ("missing", r"does not exist"),
])
def test_incomplete_checkpoint_is_one_line_error(tmp_path, tiny_llama, damage, message, no_vllm):
    ckpt = sft_checkpoint(tmp_path / "run", tiny_llama)
    given = ckpt
    if damage == "no_meta":
        (ckpt / "meta.json").unlink()
    elif damage == "no_model":
        shutil.rmtree(ckpt / "model")
    elif damage == "no_last":
        (tmp_path / "run" / "checkpoints" / "last").unlink()
        (ckpt / "meta.json").unlink()
        given = tmp_path / "run"
    else:
        given = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=message) as err:
        export(given, tmp_path / "export")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "export").exists()


def test_wrong_mode_and_foreign_out_dir(tmp_path, tiny_llama):
    sft_checkpoint(tmp_path / "run", tiny_llama)
    with pytest.raises(ConfigError, match="full fine-tune and has no adapter; use mode='merged'"):
        export(tmp_path / "run", tmp_path / "export", mode="adapter")
    with pytest.raises(ConfigError, match="mode='gguf' is invalid"):
        export(tmp_path / "run", tmp_path / "export", mode="gguf")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="exists and is not an export"):
        export(tmp_path / "run", tmp_path / "mine")


def _edit_adapter_config(ckpt: Path, **changes) -> None:
    path = ckpt / "hf_adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("case, message", [
    ("gpt2_conv1d", r"'transformer.h.0.attn.c_attn' is a Conv1D layer; vLLM serves LoRA on Linear and Embedding"),
    ("dora", r"use_dora=True: vLLM does not support DoRA"),
    ("modules_to_save", r"modules_to_save=\['lm_head'\]: vLLM does not load fully trained layers"),
    ("pissa", r"init_lora_weights='pissa' rewrites the base weights"),
    ("wrong_base", r"match no layer of .*vLLM would silently ignore them"),
])
def test_unservable_adapter_is_one_line_error(case, message, tmp_path, tiny_model_factory, tokenizer, no_vllm):
    base = tiny_model_factory("gpt2" if case == "gpt2_conv1d" else "llama")
    targets = ["c_attn"] if case == "gpt2_conv1d" else ["q_proj"]
    ckpt = lora_checkpoint(tmp_path / "run", base, tokenizer, target_modules=targets)
    if case == "dora":
        _edit_adapter_config(ckpt, use_dora=True)
    elif case == "modules_to_save":
        _edit_adapter_config(ckpt, modules_to_save=["lm_head"])
    elif case == "pissa":
        _edit_adapter_config(ckpt, init_lora_weights="pissa")
    elif case == "wrong_base":  # keys saved under a wrapper prefix (torch.compile's _orig_mod)
        from safetensors.torch import load_file, save_file

        path = ckpt / "hf_adapter" / "adapter_model.safetensors"
        save_file({k.replace(".model.layers", ".model._orig_mod.layers"): v for k, v in load_file(path).items()}, path)
    with pytest.raises(ConfigError, match=message) as err:
        export(tmp_path / "run", tmp_path / "export", mode="adapter")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "export").exists()
    if case == "gpt2_conv1d":  # merging still works: the merged model is a plain GPT-2
        assert (export(tmp_path / "run", tmp_path / "merged") / "model.safetensors").is_file()


def test_generate_rechecks_an_edited_export_before_vllm(tmp_path, tiny_llama, tokenizer, no_vllm):
    lora_checkpoint(tmp_path / "run", tiny_llama, tokenizer, target_modules=["q_proj"])
    out = export(tmp_path / "run", tmp_path / "export", mode="adapter")
    cfg = out / "adapter" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "use_dora": True}))
    with pytest.raises(ConfigError, match="vLLM does not support DoRA"):
        generate(out, ["hi"], python="/bin/true")


def test_missing_vllm_venv_says_make_vllm_venv(tmp_path, tiny_llama, no_vllm, monkeypatch):
    out = export(sft_checkpoint(tmp_path / "run", tiny_llama), tmp_path / "export")
    with pytest.raises(ConfigError, match=r"no vLLM python at .*run `make vllm-venv`"):
        generate(out, ["hi"], python=tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(ConfigError, match="is not an export"):
        generate(tmp_path, ["hi"], python="/bin/true")
