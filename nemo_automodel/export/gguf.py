"""A merged HF model folder → one GGUF file for llama.cpp and Ollama (its Modelfile: ``ollama.py``), written
by llama.cpp's own converter.

The converter is ``convert_hf_to_gguf.py`` with its ``conversion/`` package and its ``gguf-py``, taken from
the llama-cpp-python sdist pinned here (``LLAMA_CPP_PYTHON``, the version ``.venv-llamacpp`` runs, so the
files it writes are the files that llama.cpp reads). It is fetched once with ``pip download`` from the
package registry (``make venv`` does it, so tests and exports run offline afterwards; an install without
the Makefile fetches it on its first export) and unpacked into ``<cache>/llama.cpp-convert-<version>/``
(``demo.assets.cache_root``). It runs in this venv's python as a subprocess, its own ``gguf-py`` first on
the path; nothing is compiled. It needs ``sentencepiece`` for sentencepiece tokenizers (Gemma, Phi-3,
Llama 2); the rest (torch, transformers, numpy, pyyaml, tqdm, requests) the training venv has.

What stays ours around it: the outtypes offered (``OUTTYPES``: the converter's float types and ``q8_0``;
its ``tq1_0``/``tq2_0`` are for ternary BitNet weights and ``auto`` would hide the type the file name
states), the checks before it starts (a model folder with weights and a tokenizer, and an architecture in
the converter's registry, read from its source without running it), a file that appears complete or not
at all, and its failures as one line.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from nemo_automodel.errors import ConfigError, RunError, bad_value

LLAMA_CPP_PYTHON = "0.3.36"  # keep equal to the Makefile's llama-cpp-python pin (.venv-llamacpp)
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
SCRIPT = "convert_hf_to_gguf.py"
REGISTRY = "conversion/__init__.py"  # TEXT_MODEL_MAP: HF architecture -> the conversion module that writes it
# what is unpacked from the sdist's vendor/llama.cpp/ (the converter, its model classes, gguf-py, its licence)
MEMBERS = (SCRIPT, "conversion/", "gguf-py/gguf/", "LICENSE")
# architectures the converter routes on the top-level name even when text_config names another
# (``conversion/base.py`` get_model_architecture)
TOP_LEVEL_ARCHS = ("StepVLForConditionalGeneration", "Sarashina2VisionForCausalLM", "Exaone4_5_ForConditionalGeneration",
                   "Step3p7ForConditionalGeneration", "KimiK3ForConditionalGeneration")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise bad_value("outtype", outtype, f"use one of {OUTTYPES}")
    return outtype


# ---------------------------------------------------------------------------- the converter
def converter_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder holding llama.cpp's ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/``: fetched and
    unpacked once (``<cache>/llama.cpp-convert-<version>``), later calls return at once."""
    from nemo_automodel.demo.assets import build_once, cache_root

    return build_once(cache_root(cache_dir) / f"llama.cpp-convert-{LLAMA_CPP_PYTHON}", _fetch)


def _fetch(out: Path) -> None:
    """``pip download`` the llama-cpp-python sdist (no build) and unpack the converter's files into ``out``."""
    with tempfile.TemporaryDirectory(prefix="llama-cpp-python-sdist-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            why = _last_error(proc.stderr) or f"pip exited {proc.returncode}"
            raise RunError(f"GGUF export needs llama.cpp's converter from the llama-cpp-python=={LLAMA_CPP_PYTHON} "
                           f"sdist and pip could not download it ({why}): run `make venv` where the package "
                           "registry is reachable")
        prefix = f"{sdists[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(MEMBERS) and (m.isfile() or m.isdir())]
            for member in members:
                member.name = member.name[len(prefix):]
            tar.extractall(out, members=members, filter="data")
    if not (out / SCRIPT).is_file() or not (out / REGISTRY).is_file():
        raise RunError(f"llama-cpp-python=={LLAMA_CPP_PYTHON}'s sdist holds no vendor/llama.cpp/{SCRIPT} with "
                       f"{REGISTRY}: its layout changed")


def supported_architectures(converter: Path | None = None) -> frozenset[str]:
    """The HF architectures llama.cpp's converter writes as text models (its ``TEXT_MODEL_MAP``), read from its
    source without importing it."""
    source = ((converter or converter_dir()) / REGISTRY).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                node.target.id == "TEXT_MODEL_MAP" and node.value is not None:
            return frozenset(ast.literal_eval(node.value))
    raise RunError(f"llama.cpp's {REGISTRY} has no TEXT_MODEL_MAP: the converter's layout changed")


def architecture(config: dict) -> str | None:
    """The architecture the converter converts for a ``config.json`` (its get_model_architecture, text models)."""
    archs = config.get("architectures") or [None]
    text_archs = (config.get("text_config") or {}).get("architectures")
    if text_archs and archs[0] not in TOP_LEVEL_ARCHS:
        return str(text_archs[0])
    return archs[0]


def check_architecture(config: dict, model: str | Path, converter: Path | None = None) -> str:
    """The architecture llama.cpp's converter would convert for ``config`` (a ``config.json`` as a dict, of the
    model ``model``), or a one-line ConfigError when its registry has no such architecture."""
    arch = architecture(config)
    if arch is None:
        raise ConfigError(f"GGUF export: {str(model)!r}'s config names no architecture "
                          f"(model_type {config.get('model_type')!r})")
    if arch not in supported_architectures(converter):
        raise ConfigError(f"GGUF export: llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON}) cannot convert "
                          f"architecture {arch!r}")
    return arch


def _check_source(folder: Path, converter: Path) -> str:
    """The model folder's architecture, after one-line refusals of what the converter cannot take."""
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{str(folder)!r} is not a HF model folder (no config.json)")
    arch = check_architecture(json.loads((folder / "config.json").read_text()), folder, converter)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"GGUF export: {str(folder)!r} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): "
                          "the GGUF must carry one")
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"GGUF export: {str(folder)!r} holds no *.safetensors weights")
    return arch


def _last_error(log: str) -> str | None:
    """The line that says why a Python program failed: its exception, else its last ERROR log line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    exceptions = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b:?", line)]
    errors = [line.split(":", 2)[-1] for line in lines if line.startswith("ERROR:")]
    found = exceptions[-1:] or errors[-1:]
    return found[0] if found else (lines[-1] if lines else None)


# ---------------------------------------------------------------------------- entry point
def convert(model_dir: str | Path, out_file: str | Path, outtype: str = "f16", name: str | None = None) -> Path:
    """Write ``model_dir`` (a merged HF model with its tokenizer) as the GGUF file ``out_file`` with llama.cpp's
    ``convert_hf_to_gguf.py``.

    ``name`` is the GGUF's ``general.name`` (default: the file's stem). The file appears complete or
    not at all (written under a temporary name, then renamed). Raises a one-line ConfigError for an
    outtype or architecture the converter does not take, a folder without weights or tokenizer, or the
    converter's own refusal (for example a BPE pre-tokenizer it does not know).
    """
    check_outtype(outtype)
    folder = Path(model_dir).expanduser().resolve()
    converter = converter_dir()
    arch = _check_source(folder, converter)
    out = Path(out_file).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    # its own gguf-py first (NO_LOCAL_GGUF would make it import the training venv's gguf); local files only
    env = {k: v for k, v in os.environ.items() if k not in ("NO_LOCAL_GGUF", "PYTHONPATH")}
    env.update(PYTHONPATH=os.pathsep.join([str(converter / "gguf-py"), str(converter)]), HF_HUB_OFFLINE="1")
    command = [sys.executable, str(converter / SCRIPT), str(folder), "--outfile", str(tmp), "--outtype", outtype,
               "--model-name", name or out.stem]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not tmp.is_file():
            raise ConfigError(f"GGUF export: llama.cpp's {SCRIPT} (llama-cpp-python {LLAMA_CPP_PYTHON}) failed on "
                              f"{arch}: {_last_error(proc.stderr + proc.stdout) or f'exit {proc.returncode}'}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
