"""Greedy decoding, tokenization and chat formatting with llama.cpp (``llama_cpp``) on a GGUF file; runs
inside the llama.cpp venv (stdlib + numpy + llama-cpp-python only).

Usage: ``python llamacpp_runner.py IN.json OUT.json``. ``IN.json``::

    {"gguf": path, "n_ctx": 512, "prompts": [[token ids], ...], "max_tokens": 16, "ignore_eos": false,
     "texts": ["text to tokenize", ...], "chats": [[{"role", "content"}, ...], ...]}

``OUT.json``: ``{"greedy": [{"tokens": [...], "logits": [first step's logits]}, ...],
"tokenized": [[ids], ...]`` (special tokens parsed, bos as the GGUF says), ``"chat_format"`` (what
``create_chat_completion`` would use), ``"chat_template"`` (the GGUF's), ``"rendered": [prompt text
per chat]`` (llama-cpp-python's Jinja2ChatFormatter on that template), ``"eos", "bos"``}.
Greedy is argmax over llama.cpp's logits, stopping after ``max_tokens`` or at the eos token (unless
``ignore_eos``: then exactly ``max_tokens``).
"""

from __future__ import annotations

import json
import sys
from typing import Any


def run(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = Llama(model_path=job["gguf"], n_ctx=job.get("n_ctx", 512), n_threads=job.get("threads"), seed=0,
                logits_all=True, verbose=False)
    eos = llm.token_eos()
    greedy = []
    for prompt in job.get("prompts", []):
        llm.reset()
        llm.eval(prompt)
        tokens, first = [], llm.scores[llm.n_tokens - 1].tolist()
        for _ in range(job.get("max_tokens", 16)):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(token)
            if token == eos and not job.get("ignore_eos"):
                break
            llm.eval([token])
        greedy.append({"tokens": tokens, "logits": first})
    tokenized = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) for text in job.get("texts", [])]
    template = llm.metadata.get("tokenizer.chat_template")
    eos_text = llm._model.token_get_text(eos) if eos != -1 else ""
    bos = llm.token_bos()
    bos_text = llm._model.token_get_text(bos) if bos != -1 else ""
    rendered = []
    if template is not None:
        formatter = Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text)
        rendered = [formatter(messages=chat).prompt for chat in job.get("chats", [])]
    return {"greedy": greedy, "tokenized": tokenized, "chat_format": llm.chat_format, "chat_template": template,
            "rendered": rendered, "eos": eos_text, "bos": bos_text}


def main(argv: list[str]) -> int:
    src, dst = argv
    with open(src) as f:
        job = json.load(f)
    result = run(job)
    with open(dst, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
