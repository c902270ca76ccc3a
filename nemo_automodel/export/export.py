"""Export a checkpoint of ours into a folder vLLM serves (a merged HF model, or a PEFT adapter + base id),
or into a GGUF file for llama.cpp and Ollama.

Layout of an export (``nemo_export.json`` says which kind it is)::

    merged:   out/{config.json, model*.safetensors, generation_config.json, tokenizer files,
                   chat_template.jinja, nemo_export.json}   (+ processor_config.json for a vision-language model)
    adapter:  out/{adapter/{adapter_config.json, adapter_model.safetensors}, tokenizer files,
                   chat_template.jinja, nemo_export.json}   (the base model is named in the manifest)
    gguf:     out/{<out>-<outtype>.gguf, Modelfile, nemo_export.json}   (merged first; see ``gguf.py``)

The export is written under a temporary name and renamed when complete, like checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from nemo_automodel.errors import ConfigError, bad_value

MANIFEST = "nemo_export.json"
MODES = ("merged", "adapter")
FORMATS = ("hf", "gguf")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def resolve_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint folder meant by ``path``: a ``step-N`` folder, ``last``, a
    ``checkpoints/`` folder or a run directory (both resolved through ``last``)."""
    from nemo_automodel.checkpoint.save_load import latest_checkpoint

    given = Path(path).expanduser()
    if not given.exists():
        raise ConfigError(f"checkpoint={str(path)!r} does not exist")
    folder = given / "checkpoints" if (given / "checkpoints").is_dir() else given
    if not (folder / "meta.json").is_file() and ((folder / "last").is_symlink() or any(folder.glob("step-*"))):
        last = latest_checkpoint(folder)
        if last is None:
            raise ConfigError(f"checkpoint={str(path)!r} has no complete checkpoint ('last' is missing or points "
                              "at an unfinished one)")
        folder = last
    folder = folder.resolve()
    if not (folder / "meta.json").is_file():
        raise ConfigError(f"checkpoint={str(path)!r} is incomplete (no meta.json): pass a finished checkpoints/"
                          "step-N folder, checkpoints/last or the run directory")
    return folder


def checkpoint_payload(ckpt: Path) -> tuple[dict, Path]:
    """``(meta, folder)`` where folder is the checkpoint's ``model/`` (full SFT) or ``hf_adapter/`` (LoRA)."""
    meta = json.loads((ckpt / "meta.json").read_text())
    peft = bool(meta.get("peft"))
    folder = ckpt / ("hf_adapter" if peft else "model")
    needed = ADAPTER_FILES if peft else ("config.json",)
    missing = [name for name in needed if not (folder / name).is_file()]
    if peft is False and not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        kind = "LoRA" if peft else "full fine-tuning"
        raise ConfigError(f"checkpoint {str(ckpt)!r} is incomplete: it is a {kind} checkpoint but "
                          f"{folder.name}/ lacks {', '.join(missing)}")
    return meta, folder


def _local_or_id(name: str, relative_to: Path) -> str:
    """An absolute path for a base model that exists locally, else the Hub id unchanged."""
    for candidate in (Path(name).expanduser(), relative_to / name):
        if (candidate / "config.json").is_file():
            return str(candidate.resolve())
    return name


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files, chat template and (vision-language models) processor/preprocessor
    configs the checkpoint saved next to its weights."""
    skip = {*ADAPTER_FILES, "README.md", "config.json", "generation_config.json"}
    for item in src.iterdir():
        if item.is_file() and item.name not in skip and not item.name.endswith(".safetensors"):
            shutil.copy2(item, dst / item.name)
    if not (dst / "tokenizer_config.json").is_file():
        raise ConfigError(f"{str(src)!r} holds no tokenizer (tokenizer_config.json): the export would not serve")


def _prepare_out(out: Path) -> Path:
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ConfigError(f"out_dir={str(out)!r} exists and is not an export: pick an empty or new folder")
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def export(checkpoint: str | Path, out_dir: str | Path, mode: Literal["merged", "adapter"] = "merged",
           base_model: str | None = None, lora_name: str | None = None,
           format: Literal["hf", "gguf"] = "hf", outtype: str = "f16") -> Path:
    """Write a vLLM-ready (or, with ``format="gguf"``, llama.cpp/Ollama-ready) export of ``checkpoint``
    into ``out_dir`` and return ``out_dir``.

    Args:
        checkpoint: a ``checkpoints/step-N`` folder, ``checkpoints/last`` or the run directory;
            full SFT (``model/``) or LoRA (``hf_adapter/``), single-process or sharded.
        mode: ``merged`` writes a plain HF model (LoRA is merged into the base weights);
            ``adapter`` writes the PEFT adapter for vLLM's LoRA serving (LoRA checkpoints only).
        base_model: base model id/folder for LoRA checkpoints (default: the adapter's own).
        lora_name: the adapter's name when served (default: the export folder's name).
        format: ``hf`` (safetensors for vLLM) or ``gguf`` (one GGUF file with the tokenizer and chat
            template inside, plus an Ollama ``Modelfile``; the model is merged first).
        outtype: the GGUF's weight type: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (``gguf`` only).

    Raises ConfigError (one line, before vLLM starts) for an incomplete checkpoint, a wrong mode,
    or an adapter vLLM cannot serve (see ``servable``).
    """
    if mode not in MODES:
        raise bad_value("mode", mode, f"use one of {MODES}")
    if format not in FORMATS:
        raise bad_value("format", format, f"use one of {FORMATS}")
    if format == "gguf":
        from nemo_automodel.export.gguf import check_outtype

        check_outtype(outtype)
        if mode == "adapter":
            raise ConfigError("mode='adapter' with format='gguf': llama.cpp and Ollama get one merged model; "
                              "use mode='merged'")
    ckpt = resolve_checkpoint(checkpoint)
    meta, src = checkpoint_payload(ckpt)
    peft = bool(meta.get("peft"))
    if mode == "adapter" and not peft:
        raise ConfigError(f"mode='adapter': checkpoint {str(ckpt)!r} is a full fine-tune and has no adapter; "
                          "use mode='merged'")
    out = Path(out_dir).expanduser().resolve()
    manifest: dict = {"manifest_version": 1, "format": format, "mode": mode, "checkpoint": str(ckpt),
                      "step": meta.get("step"), "model": ".", "tokenizer": ".", "adapter": None}
    if peft:
        from nemo_automodel.export.servable import check_servable, read_adapter_config

        base = _local_or_id(base_model or read_adapter_config(src).get("base_model_name_or_path") or "", ckpt)
        if not base:
            raise ConfigError(f"checkpoint {str(ckpt)!r}: the adapter names no base model; pass base_model=")
        manifest["base_model"] = base
        if mode == "adapter":
            info = check_servable(src, base)
            manifest.update(model=base, adapter="adapter", max_lora_rank=info.max_lora_rank,
                            lora_name=lora_name or out.name, lora_modules=list(info.modules))
    if format == "gguf":
        _check_gguf_source(manifest["base_model"] if peft else src)
    tmp = _prepare_out(out)
    try:
        if format == "gguf":
            manifest.update(_write_gguf(src, tmp, out.name, outtype, manifest.get("base_model") if peft else None))
        elif not peft:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        elif mode == "merged":
            _merge(src, tmp, manifest["base_model"])
        else:
            _write_adapter(src, tmp / "adapter", manifest["base_model"])
        if format == "hf":
            _copy_tokenizer(src, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _check_gguf_source(model: str | Path) -> None:
    """Refuse, before any merge, what the GGUF export cannot write: a vision-language model (GGUF holds a text
    model only; llama.cpp reads a vision tower from a separate mmproj file) or an architecture llama.cpp's
    converter does not know."""
    from nemo_automodel.export.gguf import check_architecture
    from nemo_automodel.models.hf_loading import load_config, loadable_as

    config = load_config(str(model))
    if "image_text_to_text" in loadable_as(config):
        raise ConfigError(f"format='gguf': {str(model)!r} is a vision-language model ({type(config).__name__}) and "
                          "GGUF export of vision-language models is not supported; export format='hf' for vLLM")
    check_architecture(config.to_dict(), model)


def _merge(adapter_dir: Path, out: Path, base: str) -> None:
    from nemo_automodel.peft.lora import merge_adapter

    merge_adapter(adapter_dir, out, base_model=base)


def _write_gguf(src: Path, out: Path, name: str, outtype: str, base: str | None) -> dict:
    """Convert the model (LoRA merged into ``base`` first, in a temp folder) into ``out/<name>-<outtype>.gguf``
    and write the Ollama Modelfile beside it; the manifest fields that say so."""
    import tempfile

    from nemo_automodel.export.gguf import convert
    from nemo_automodel.export.ollama import write_modelfile

    with tempfile.TemporaryDirectory(prefix=".merge-", dir=out.parent) as scratch:
        model_dir = src
        if base is not None:
            model_dir = Path(scratch)
            _merge(src, model_dir, base)
            _copy_tokenizer(src, model_dir)
        gguf_file = convert(model_dir, out / f"{name}-{outtype}.gguf", outtype, name=name)
        write_modelfile(model_dir, gguf_file)
    return {"gguf": gguf_file.name, "outtype": outtype, "model": None, "tokenizer": None, "modelfile": "Modelfile"}


def _write_adapter(adapter_dir: Path, out: Path, base: str) -> None:
    out.mkdir()
    shutil.copy2(adapter_dir / "adapter_model.safetensors", out / "adapter_model.safetensors")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def read_export(export_dir: str | Path, format: str | None = "hf") -> dict:
    """The manifest of an export with paths made absolute; a plain HF model folder counts as merged.

    ``format`` is the kind the caller can use (``hf`` for vLLM, ``gguf``, None for either); another
    kind is a one-line ConfigError.
    """
    root = Path(export_dir).expanduser().resolve()
    path = root / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
    elif (root / "config.json").is_file():
        manifest = {"mode": "merged", "model": ".", "tokenizer": ".", "adapter": None}
    else:
        raise ConfigError(f"export_dir={str(export_dir)!r} is not an export (no {MANIFEST} or config.json): "
                          "write one with llm.api.export(checkpoint, out_dir)")
    kind = manifest.get("format") if manifest.get("format") in FORMATS else "hf"  # manifests before GGUF: 1
    manifest["format"] = kind
    if format is not None and kind != format:
        hint = (" (for llama.cpp/Ollama: `ollama create NAME -f Modelfile` in it); export again with "
                "format='hf' for vLLM") if kind == "gguf" else ""
        raise ConfigError(f"export {str(root)!r} is a format={kind!r} export, not {format!r}{hint}")
    manifest["root"] = str(root)
    if kind == "gguf":
        gguf_file = root / str(manifest.get("gguf"))
        if not gguf_file.is_file():
            raise ConfigError(f"export {str(root)!r} is incomplete: {gguf_file.name} is missing")
        manifest["gguf"] = str(gguf_file)
        return manifest
    for key in ("model", "tokenizer", "adapter"):
        value = manifest.get(key)
        if value and (root / value).exists():
            manifest[key] = str((root / value).resolve())
    if manifest["mode"] == "merged" and not any(Path(manifest["model"]).glob("*.safetensors")):
        raise ConfigError(f"export {str(root)!r} is incomplete: no *.safetensors weights")
    return manifest
