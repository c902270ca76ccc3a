"""The chat template seen from Ollama: is it ChatML (probed by rendering), its end-of-turn token, and
the ``Modelfile`` written beside a GGUF (FROM, TEMPLATE in Ollama's Go-template syntax for ChatML,
SYSTEM for a template's default system prompt, PARAMETER stop)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHATML = ("<|im_start|>", "<|im_end|>")


def chat_template(tokenizer: Any) -> str | None:
    """The tokenizer's (default) Jinja chat template, or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def _chatml(messages: list[dict], generation: bool) -> str:
    start, end = CHATML
    text = "".join(f"{start}{m['role']}\n{m['content']}{end}\n" for m in messages)
    return text + (f"{start}assistant\n" if generation else "")


def chatml_default_system(tokenizer: Any) -> str | None:
    """``""`` or the default system prompt when the chat template renders exactly ChatML, else None.

    Probed by rendering: a conversation with a system turn, one without (where a template may add its
    default system prompt), with and without the generation prompt.
    """
    template = chat_template(tokenizer)
    vocab = tokenizer.get_vocab()
    if template is None or not all(t in vocab for t in CHATML):
        return None
    system = {"role": "system", "content": "S1"}
    turns = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "U2"}]

    def render(messages: list[dict], generation: bool) -> str | None:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception:  # a template that needs more (tools, strict alternation) is not plain ChatML
            return None

    for messages, generation in (([system, *turns], True), ([system, *turns[:2]], False)):
        if render(messages, generation) != _chatml(messages, generation):
            return None
    bare = render(turns, True)
    if bare == _chatml(turns, True):
        return ""
    start, end = CHATML
    head = f"{start}system\n"
    if bare is None or not bare.startswith(head) or f"{end}\n" not in bare:
        return None
    default = bare[len(head):bare.index(f"{end}\n")]
    return default if bare == _chatml([{"role": "system", "content": default}, *turns], True) else None


def end_of_turn(tokenizer: Any) -> str | None:
    """The token that ends a turn: ``<|im_end|>`` for ChatML, else None (eos ends the answer)."""
    return CHATML[1] if chatml_default_system(tokenizer) is not None else None


OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)


def modelfile_text(tokenizer: Any, gguf_name: str, generation_config: dict | None = None) -> str:
    """An Ollama Modelfile for ``gguf_name``: FROM, the stop tokens, and a TEMPLATE for ChatML models."""
    lines = ["# Ollama: ollama create <name> -f Modelfile && ollama run <name>", f"FROM ./{gguf_name}"]
    default = chatml_default_system(tokenizer)
    if default is not None:
        lines.append(f'TEMPLATE """{OLLAMA_CHATML}"""')
        if default and '"""' not in default:
            lines.append(f'SYSTEM """{default}"""')
    elif chat_template(tokenizer):
        lines.append("# No TEMPLATE: the chat template is not ChatML, so it is not translated to Go template "
                     "syntax here; Ollama derives one from the template embedded in the GGUF "
                     "(tokenizer.chat_template). Add a TEMPLATE if its replies run on.")
    else:
        lines.append("# No TEMPLATE: the model has no chat template (plain completion).")
    for token in stop_tokens(tokenizer, generation_config):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    return "\n".join(lines) + "\n"


def stop_tokens(tokenizer: Any, generation_config: dict | None = None) -> list[str]:
    """End-of-turn and eos token texts (the tokenizer's and generation_config.json's eos ids)."""
    ids = (generation_config or {}).get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids]
    texts = [end_of_turn(tokenizer), tokenizer.eos_token, *(tokenizer.convert_ids_to_tokens(i) for i in ids if
                                                            isinstance(i, int) and i < len(tokenizer))]
    return list(dict.fromkeys(t for t in texts if t))


def write_modelfile(model_dir: str | Path, gguf_file: str | Path) -> Path:
    """Write ``Modelfile`` beside ``gguf_file`` for the model (tokenizer, chat template) in ``model_dir``."""
    from transformers import AutoTokenizer

    gguf_file = Path(gguf_file)
    gen_path = Path(model_dir) / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    text = modelfile_text(AutoTokenizer.from_pretrained(model_dir), gguf_file.name, gen)
    path = gguf_file.with_name("Modelfile")
    path.write_text(text)
    return path
