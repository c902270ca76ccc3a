"""GGUF export: tiny random Llama/Qwen2/Mistral → GGUF → reloaded by transformers' own GGUF loader
(weights, greedy tokens, tokenizer, chat template), the Ollama Modelfile, export()/CLI wiring and the
one-line refusals. llama.cpp itself is checked in test_gguf_llamacpp.py (``make gguf-llamacpp``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf_support import ARCHS, CHATS, DIMS, PRE, TEXTS, build_tiny, rounded
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_automodel import llm
from nemo_automodel.errors import ConfigError
from nemo_automodel.export import export, read_export
from nemo_automodel.export.gguf import convert
from nemo_automodel.export.ollama import modelfile_text, write_modelfile
from tests.helpers import chat_dataset

PROMPTS = ["The capital of France is", "def fib(n):", "1, 2, 3, 4,"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    """``make(arch) -> folder`` of a tiny random model (``gguf_support.build_tiny``), built once per module."""
    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_tiny(arch, tmp_path_factory.mktemp(f"tiny-{arch}-hf"), tokenizer_dir)
        return cache[arch]

    return make


def _gguf_fields(path: Path) -> tuple[dict, dict]:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.pre", "tokenizer.ggml.model") \
                and not key.endswith("_id") and not key.startswith("tokenizer.ggml.add_"):
            continue
        fields[key] = field.contents()
    return fields, {t.name: t.tensor_type.name for t in reader.tensors}


def _assert_q8_0_close(name: str, original: torch.Tensor, loaded: torch.Tensor) -> float:
    """Q8_0 keeps blocks of 32 as int8 times an f16 scale d = max|x| / 127: each value is off by at most
    half a step, plus what the scale's own f16 rounding moves the largest code (127 * |d16 - d|)."""
    x = original.reshape(-1, 32).double()
    y = loaded.reshape(-1, 32).double()
    d = x.abs().amax(dim=1, keepdim=True) / 127
    d16 = d.half().double()
    bound = d16 / 2 + 127 * (d16 - d).abs() + 1e-9
    excess = ((y - x).abs() - bound).max().item()
    assert excess <= 0, f"{name}: q8_0 error exceeds its block bound by {excess}"
    return (y - x).abs().max().item()


def _greedy(model, tokenizer) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def _roundtrip(src: Path, out_dir: Path, outtype: str):
    path = convert(src, out_dir / f"tiny-{outtype}.gguf", outtype)
    assert sorted(p.name for p in out_dir.iterdir()) == [path.name]  # no temp file left over
    loaded = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=path.name, dtype=torch.float32).eval()
    return path, loaded


# transformers' GGUF loader spends ~10 s parsing SmolLM2's 49k-token vocabulary: one case stays fast
RELOADS = [pytest.param(arch, outtype, marks=() if (arch, outtype) == ("llama", "f32") else pytest.mark.slow)
           for arch in ARCHS for outtype in ("f32", "f16", "bf16", "q8_0")]


@pytest.mark.parametrize("arch, outtype", RELOADS)
def test_gguf_reloads_in_transformers(arch, outtype, tiny, tmp_path):
    src = tiny(arch)
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    path, loaded = _roundtrip(src, tmp_path, outtype)

    fields, types = _gguf_fields(path)
    assert fields["general.architecture"] == ("qwen2" if arch == "qwen2" else "llama")
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == PRE[arch]
    big = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == big
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert ("output.weight" in types) == (arch != "llama")  # tied embeddings are written once

    want, got = original.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    worst = 0.0
    for name, weight in want.items():
        if outtype == "q8_0" and weight.dim() == 2:
            worst = max(worst, _assert_q8_0_close(name, weight, got[name]))
        else:  # f32 exact; f16/bf16 exactly the rounding of the original (torch's round-to-nearest-even)
            assert torch.equal(got[name], rounded(weight, outtype)), name
            worst = max(worst, (got[name] - weight).abs().max().item())
    print(f"{arch} {outtype}: max |weight diff| {worst:.3g}")
    if outtype == "f32":
        assert worst == 0.0

    # the config travelled (rope theta, eps, head_dim, tying, heads): the original architecture with
    # the reloaded weights computes exactly what the reloaded model computes
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    reference.load_state_dict(got)
    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
    greedy = _greedy(loaded, tokenizer)
    assert greedy == _greedy(reference, tokenizer)
    if outtype == "f32":
        assert greedy == _greedy(original, tokenizer)


@pytest.mark.parametrize("arch", [pytest.param("llama", marks=pytest.mark.slow), "qwen2",
                                  pytest.param("mistral", marks=pytest.mark.slow)])
def test_gguf_tokenizer_and_chat_template_travel(arch, tiny, tmp_path):
    src = tiny(arch)
    path = convert(src, tmp_path / "tok.gguf", "f32")
    ours = AutoTokenizer.from_pretrained(src)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert theirs(text).input_ids == ours(text).input_ids, text
        assert theirs.decode(ours(text).input_ids) == ours.decode(ours(text).input_ids)
    assert theirs.chat_template == ours.chat_template and ours.chat_template
    for chat in CHATS:
        for generation in (True, False):
            assert (theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
                    == ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation))
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == (ours.bos_token, ours.eos_token, ours.pad_token)
    fields, _ = _gguf_fields(path)
    assert fields["tokenizer.ggml.add_bos_token"] is False  # SmolLM2's tokenizer adds no bos
    assert fields["tokenizer.ggml.eos_token_id"] == ours.eos_token_id


def test_special_tokens_are_control_and_vocab_matches_rows(tiny, tmp_path):
    import gguf

    src = tiny("llama")
    path = convert(src, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    tok = AutoTokenizer.from_pretrained(src)
    assert len(tokens) == len(types) == reader.fields["llama.vocab_size"].contents() == len(tok)
    control = {tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    assert control == set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= control
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and tokens[300] == tok.convert_ids_to_tokens(300)
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) == 48900


def test_llama3_rope_scaling_travels_as_rope_freqs(tiny, tmp_path):
    """Llama 3.1's scaled frequencies: 1 where the wavelength is short, ``factor`` where it is long, smooth
    between (llama.cpp divides each frequency by it; test_gguf_llamacpp.py checks the logits)."""
    import gguf

    path = convert(tiny("llama3"), tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(path)
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    factors = torch.from_numpy(freqs.data.copy())
    assert freqs.tensor_type.name == "F32" and factors.shape == (DIMS["hidden_size"] // DIMS["num_attention_heads"] // 2,)
    assert factors[0] == 1 and torch.allclose(factors[2:], torch.full((len(factors) - 2,), 8.0))
    assert 1 < factors[1] < 8  # between the two wavelength bounds: smoothed
    assert reader.fields["llama.rope.freq_base"].contents() == 500000.0


def test_vocab_is_padded_to_the_embedding_rows(tiny, tmp_path):
    import gguf

    src = tmp_path / "padded"
    shutil.copytree(tiny("qwen2"), src)
    model = AutoModelForCausalLM.from_pretrained(src)
    n = len(AutoTokenizer.from_pretrained(src))
    model.resize_token_embeddings(n + 7)
    model.save_pretrained(src)
    path = convert(src, tmp_path / "out" / "m.gguf", "f32")
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == n + 7 and tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 7)]
    assert set(types[n:]) == {gguf.TokenType.UNUSED}


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
def test_refusals_are_one_line(tiny, tiny_model_factory, tmp_path):
    cases = []
    gpt2 = tiny_model_factory("gpt2")
    with pytest.raises(ConfigError, match=r"architecture \['GPT2LMHeadModel'\] is not supported; supported: "
                                          r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM") as err:
        convert(gpt2, tmp_path / "a.gguf")
    cases.append(err)
    with pytest.raises(ConfigError, match=r"outtype='q4_k' is invalid: use one of \('f32', 'f16', 'bf16', 'q8_0'\)") as err:
        convert(tiny("llama"), tmp_path / "b.gguf", "q4_k")
    cases.append(err)
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for item in tiny("llama").iterdir():
        if item.name in ("config.json", "model.safetensors"):
            shutil.copy2(item, bare / item.name)
    with pytest.raises(ConfigError, match="holds no tokenizer") as err:
        convert(bare, tmp_path / "c.gguf")
    cases.append(err)
    odd = tmp_path / "odd-pretokenizer"
    shutil.copytree(tiny("llama"), odd)
    spec = json.loads((odd / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (odd / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=r"pre-tokenizer \['Whitespace'\] has no llama.cpp equivalent") as err:
        convert(odd, tmp_path / "d.gguf")
    cases.append(err)
    yarn = tmp_path / "yarn"
    shutil.copytree(tiny("llama"), yarn)
    cfg = json.loads((yarn / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 64}
    (yarn / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"rope scaling 'yarn' is not supported; supported: \('default', "
                                          r"'linear', 'llama3'\)") as err:
        convert(yarn, tmp_path / "e.gguf")
    cases.append(err)
    assert all("\n" not in str(e.value) for e in cases)
    assert not [p.name for p in tmp_path.glob("*.gguf")] and not list(tmp_path.glob(".*.tmp"))


def test_a_failed_write_leaves_no_file(tiny, tmp_path, monkeypatch):
    from nemo_automodel.export import gguf as module

    calls = []

    def failing(array, qtype):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(array, qtype)

    real = module._convert
    monkeypatch.setattr(module, "_convert", failing)
    with pytest.raises(OSError, match="disk full"):
        convert(tiny("llama"), tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- export() and the CLI
def _sft_checkpoint(root: Path, model_dir: Path) -> Path:
    ckpt = root / "checkpoints" / "step-000001"
    shutil.copytree(model_dir, ckpt / "model")
    (ckpt / "meta.json").write_text(json.dumps({"step": 1, "world_size": 1, "peft": False}))
    (root / "checkpoints" / "last").symlink_to(ckpt.name)
    return ckpt


def test_full_sft_gguf_export_layout_and_manifest(tiny, tmp_path):
    run = tmp_path / "run"
    _sft_checkpoint(run, tiny("qwen2"))
    out = export(run, tmp_path / "qwen-chat", format="gguf", outtype="f32")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "nemo_export.json", "qwen-chat-f32.gguf"]
    manifest = read_export(out, format="gguf")
    assert manifest["format"] == "gguf" and manifest["outtype"] == "f32" and manifest["mode"] == "merged"
    assert manifest["gguf"] == str(out / "qwen-chat-f32.gguf") and manifest["step"] == 1
    assert (out / "Modelfile").read_text().startswith("# Ollama") and "FROM ./qwen-chat-f32.gguf" in (
        out / "Modelfile").read_text()
    with pytest.raises(ConfigError, match="is a format='gguf' export, not 'hf'.*ollama create") as err:
        read_export(out)  # what vLLM's generate/serve call
    assert "\n" not in str(err.value)
    hf = export(run, tmp_path / "hf")
    assert read_export(hf)["format"] == "hf"  # hf exports read as before


def test_gguf_export_refuses_adapter_mode_and_bad_format(tiny, tmp_path):
    run = tmp_path / "run"
    _sft_checkpoint(run, tiny("llama"))
    with pytest.raises(ConfigError, match="mode='adapter' with format='gguf'.*use mode='merged'"):
        export(run, tmp_path / "a", mode="adapter", format="gguf")
    with pytest.raises(ConfigError, match=r"format='onnx' is invalid: use one of \('hf', 'gguf'\)"):
        export(run, tmp_path / "b", format="onnx")
    with pytest.raises(ConfigError, match="outtype='q4_0' is invalid"):
        export(run, tmp_path / "c", format="gguf", outtype="q4_0")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_cli_bad_input_exits_2(tmp_path, tiny_model_factory):
    from nemo_automodel.export.__main__ import main

    proc = subprocess.run([sys.executable, "-m", "nemo_automodel.export", "export", str(tmp_path / "nowhere"),
                           str(tmp_path / "out"), "--format", "gguf", "--outtype", "q8_0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: checkpoint={str(tmp_path / 'nowhere')!r} does not exist"]
    _sft_checkpoint(tmp_path / "run", tiny_model_factory("gpt2"))
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

