"""GGUF export through llama.cpp's own converter: tiny random models of six families (Llama/SmolLM2, Gemma2,
Gemma3, Phi-3, Qwen3, Qwen3-MoE) converted once each and reloaded by transformers' own GGUF loader (weights
and logits against the original), the tokenizer and chat template through the GGUF, the Ollama Modelfile,
export()/CLI wiring and the one-line refusals. llama.cpp itself runs the GGUFs in test_gguf_llamacpp.py
(``make gguf-llamacpp``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf_support import CHATS, FAMILIES, TEXTS, build_tiny, prompt_ids
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_automodel import llm
from nemo_automodel.errors import ConfigError
from nemo_automodel.export import export, read_export
from nemo_automodel.export.gguf import LLAMA_CPP_PYTHON, convert, converter_dir, supported_architectures
from nemo_automodel.export.ollama import modelfile_text, write_modelfile
from tests.helpers import chat_dataset

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The capital of France is", "def fib(n):", "1, 2, 3, 4,"]
NEW_TOKENS = 12
# f32 GGUFs hold the weights exactly, except Gemma's norms, which llama.cpp stores as 1 + w (transformers
# subtracts the 1 again on reading: w moves by up to an ulp of 1 + w, measured 1.2e-7); the logits measured
# equal (difference 0, logits up to 3.2) for all six families. The tolerance leaves room for that rounding.
LOGIT_TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    """``make(family) -> folder`` of a tiny random model (``gguf_support.build_tiny``), built once per module."""
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}-hf"), tokenizer_dir)
        return cache[family]

    return make


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """``make(family) -> (HF folder, f32 GGUF)``: one conversion per family and module."""
    cache: dict[str, tuple[Path, Path]] = {}

    def make(family: str) -> tuple[Path, Path]:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"gguf-{family}") / f"tiny-{family}-f32.gguf"
            cache[family] = (tiny(family), convert(tiny(family), out, "f32"))
        return cache[family]

    return make


def _greedy(model, tokenizer) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def _tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


# Llama (SmolLM2's layout and tokenizer) reloads weight for weight in test_lora_run_exports_to_gguf_equal_to_the_merged_model
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_family_converts_and_reloads_in_transformers(family, converted):
    src, path = converted(family)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left over
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    assert type(loaded) is type(original)
    want, got = original.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    weights = max((got[k] - want[k]).abs().max().item() for k in want)
    ids = torch.tensor(prompt_ids(family, count=1, length=24))
    with torch.no_grad():
        reference, logits = original(ids).logits, loaded(ids).logits
    diff = (logits - reference).abs().max().item()
    print(f"{family}: max |weight diff| {weights:.3g}, max |logit diff| {diff:.3g} (logits up to "
          f"{reference.abs().max().item():.3g})")
    assert diff <= LOGIT_TOL, f"{family}: logits differ by {diff:.3g}"
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def test_tokenizer_and_chat_template_travel(converted):
    """SmolLM2's byte-level BPE (llama.cpp's "smollm" pre-tokenizer) as transformers reads it back from the GGUF."""
    src, path = converted("llama")
    ours = AutoTokenizer.from_pretrained(src)
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert theirs(text).input_ids == ours(text).input_ids, text
        assert theirs.decode(ours(text).input_ids) == ours.decode(ours(text).input_ids)
    assert theirs.chat_template == ours.chat_template and ours.chat_template
    for chat in CHATS:
        for generation in (True, False):
            assert (theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
                    == ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation))
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == (ours.bos_token, ours.eos_token, ours.pad_token)


def test_converter_is_the_pinned_llamacpp_one():
    """The converter comes from the llama-cpp-python version .venv-llamacpp builds (the Makefile's pin), and its
    registry, read without running it, holds the families above."""
    assert f"llama-cpp-python=={LLAMA_CPP_PYTHON}" in (ROOT / "Makefile").read_text()
    folder = converter_dir()
    assert folder.name == f"llama.cpp-convert-{LLAMA_CPP_PYTHON}" and (folder / "convert_hf_to_gguf.py").is_file()
    archs = supported_architectures(folder)
    assert {"LlamaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "Qwen3ForCausalLM",
            "Qwen3MoeForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= archs
    assert "OPTForCausalLM" not in archs and len(archs) > 200
# ---------------------------------------------------------------------------- Modelfile
def test_modelfile_chatml_gets_template_system_and_stops(tokenizer):
    text = modelfile_text(tokenizer, "m-f16.gguf")
    assert "FROM ./m-f16.gguf\n" in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert [line for line in text.splitlines() if line.startswith("PARAMETER")] == ['PARAMETER stop "<|im_end|>"']


def test_modelfile_without_default_system_and_with_generation_eos(tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    text = modelfile_text(tok, "m.gguf", {"eos_token_id": [2, 0]})
    lines = text.splitlines()
    assert any(line.startswith("TEMPLATE") for line in lines) and not any(line.startswith("SYSTEM") for line in lines)
    assert text.count("PARAMETER stop") == 2 and 'PARAMETER stop "<|endoftext|>"' in text


def test_modelfile_other_templates_rely_on_the_embedded_one(tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    tok.save_pretrained(tmp_path)
    path = write_modelfile(tmp_path, tmp_path / "m.gguf")
    text = path.read_text()
    assert path.name == "Modelfile" and not any(line.startswith("TEMPLATE") for line in text.splitlines())
    assert "embedded in the GGUF (tokenizer.chat_template)" in text
    assert 'PARAMETER stop "<|im_end|>"' in text  # eos still stops generation


# ---------------------------------------------------------------------------- refusals
def _tiny_opt(out: Path, tokenizer_dir: Path) -> Path:
    """A tiny OPT: a family transformers has and llama.cpp's converter does not."""
    import transformers

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = transformers.OPTConfig(vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                 num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_refusals_are_one_line(tiny, tokenizer_dir, tmp_path):
    errors = []
    opt = _tiny_opt(tmp_path / "opt", tokenizer_dir)
    with pytest.raises(ConfigError, match=rf"llama.cpp's converter \(llama-cpp-python {LLAMA_CPP_PYTHON}\) cannot "
                                          r"convert architecture 'OPTForCausalLM'$") as err:
        convert(opt, tmp_path / "a.gguf")
    errors.append(err)
    with pytest.raises(ConfigError, match=r"outtype='q4_k' is invalid: use one of \('f32', 'f16', 'bf16', 'q8_0'\)") as err:
        convert(tiny("qwen3"), tmp_path / "b.gguf", "q4_k")
    errors.append(err)
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for item in tiny("qwen3").iterdir():
        if item.name in ("config.json", "model.safetensors"):
            shutil.copy2(item, bare / item.name)
    with pytest.raises(ConfigError, match="holds no tokenizer") as err:
        convert(bare, tmp_path / "c.gguf")
    errors.append(err)
    # the converter's own refusal: a byte-level BPE whose pre-tokenizer llama.cpp does not know (it hashes how the
    # tokenizer splits a probe text)
    odd = tmp_path / "odd-pretokenizer"
    shutil.copytree(tiny("llama"), odd)
    spec = json.loads((odd / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (odd / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=r"convert_hf_to_gguf.py \(llama-cpp-python [\d.]+\) failed on "
                                          r"LlamaForCausalLM: NotImplementedError: BPE pre-tokenizer was not "
                                          r"recognized") as err:
        convert(odd, tmp_path / "d.gguf")
    errors.append(err)
    assert all("\n" not in str(e.value) for e in errors)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))  # nothing half-written


# ---------------------------------------------------------------------------- export() and the CLI
def _sft_checkpoint(root: Path, model_dir: Path) -> Path:
    ckpt = root / "checkpoints" / "step-000001"
    shutil.copytree(model_dir, ckpt / "model")
    (ckpt / "meta.json").write_text(json.dumps({"step": 1, "world_size": 1, "peft": False}))
    (root / "checkpoints" / "last").symlink_to(ckpt.name)
    return ckpt


def test_full_sft_gguf_export_layout_and_manifest(tiny, tmp_path):
    run = tmp_path / "run"
    _sft_checkpoint(run, tiny("qwen3"))
    out = export(run, tmp_path / "qwen-chat", format="gguf")  # outtype f16 by default
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "nemo_export.json", "qwen-chat-f16.gguf"]
    manifest = read_export(out, format="gguf")
    assert manifest["format"] == "gguf" and manifest["outtype"] == "f16" and manifest["mode"] == "merged"
    assert manifest["gguf"] == str(out / "qwen-chat-f16.gguf") and manifest["step"] == 1
    types = _tensor_types(out / "qwen-chat-f16.gguf")
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == types["blk.0.attn_q_norm.weight"] == "F32"
    text = (out / "Modelfile").read_text()
    assert text.startswith("# Ollama") and "FROM ./qwen-chat-f16.gguf" in text
    with pytest.raises(ConfigError, match="is a format='gguf' export, not 'hf'.*ollama create") as err:
        read_export(out)  # what vLLM's generate/serve call
    assert "\n" not in str(err.value)
    hf = export(run, tmp_path / "hf")
    assert read_export(hf)["format"] == "hf"  # hf exports read as before


def test_gguf_export_refuses_adapter_mode_and_bad_format(tiny, tmp_path):
    run = tmp_path / "run"
    _sft_checkpoint(run, tiny("qwen3"))
    with pytest.raises(ConfigError, match="mode='adapter' with format='gguf'.*use mode='merged'"):
        export(run, tmp_path / "a", mode="adapter", format="gguf")
    with pytest.raises(ConfigError, match=r"format='onnx' is invalid: use one of \('hf', 'gguf'\)"):
        export(run, tmp_path / "b", format="onnx")
    with pytest.raises(ConfigError, match="outtype='q4_0' is invalid"):
        export(run, tmp_path / "c", format="gguf", outtype="q4_0")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_cli_bad_input_exits_2(tmp_path, tokenizer_dir):
    from nemo_automodel.export.__main__ import main

    proc = subprocess.run([sys.executable, "-m", "nemo_automodel.export", "export", str(tmp_path / "nowhere"),
                           str(tmp_path / "out"), "--format", "gguf", "--outtype", "q8_0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: checkpoint={str(tmp_path / 'nowhere')!r} does not exist"]
    _sft_checkpoint(tmp_path / "run", _tiny_opt(tmp_path / "opt", tokenizer_dir))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "gguf"]) == 2
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusal of an unknown outtype
        main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "gguf", "--outtype", "q2"])
    assert exit_.value.code == 2
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory) -> Path:
    """A LoRA run of our trainer (single process) on the tiny Llama: a real checkpoint with a real adapter."""
    import fiddle as fdl

    from nemo_automodel import lightning as nl

    return llm.api.finetune(
        model=llm.HFAutoModelForCausalLM(str(tiny("llama"))), peft=llm.peft.LoRA(target_modules=["*_proj"], dim=8),
        data=llm.HFDatasetDataModule(chat_dataset(), formatting="chat", seq_length=64, micro_batch_size=4,
                                     global_batch_size=8),
        optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=1e-2)),
        trainer=nl.Trainer(max_steps=6, log_every_n_steps=1, enable_progress_bar=False),
        log=nl.NeMoLogger(log_dir=str(tmp_path_factory.mktemp("runs")), name="lora"),
    )


@pytest.mark.slow
def test_lora_run_exports_to_gguf_equal_to_the_merged_model(lora_run, tiny, tmp_path):
    merged = AutoModelForCausalLM.from_pretrained(export(lora_run, tmp_path / "hf"), dtype=torch.float32).eval()
    out = export(lora_run, tmp_path / "chat", format="gguf", outtype="f32")
    assert json.loads((out / "nemo_export.json").read_text())["base_model"] == str(tiny("llama").resolve())
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="chat-f32.gguf", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny("llama"), dtype=torch.float32).state_dict()
    got, want = loaded.state_dict(), merged.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    moved = [k for k in want if not torch.equal(want[k], base[k])]
    assert any("q_proj" in k for k in moved) and any("down_proj" in k for k in moved)  # the adapter is in
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert _greedy(loaded, tokenizer) == _greedy(merged, tokenizer)
    text = (out / "Modelfile").read_text()
    assert "FROM ./chat-f32.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    # the CLI writes the same file
    from nemo_automodel.export.__main__ import main

    assert main(["export", str(lora_run), str(tmp_path / "chat-cli"), "--format", "gguf", "--outtype", "f32"]) == 0
    cli = AutoModelForCausalLM.from_pretrained(tmp_path / "chat-cli", gguf_file="chat-cli-f32.gguf").state_dict()
    assert all(torch.equal(cli[k], want[k]) for k in want)

