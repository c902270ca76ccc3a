"""Our GGUFs in llama.cpp itself (llama-cpp-python in its own venv, ``make gguf-llamacpp``): greedy tokens
and logits against transformers on the original weights, tokenization, and the chat template rendered by
llama-cpp-python against our training-time ``apply_chat_template``.

The references never come from the GGUF: they are the original HF models, with matrices rounded to f16
in torch for the f16 file, so a layout mistake in the converter (the q/k rope permutation) cannot cancel.
Quantized GGUFs are not run here: they segfault in llama_decode on this CPU (FACTS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from gguf_support import ARCHS, CHATS, TEXTS, build_tiny, rounded
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_automodel.export.gguf import convert
from tests.helpers import unavailable

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "nemo_automodel" / "export" / "llamacpp_runner.py"
PYTHON_ENV = "NEMO_AUTOMODEL_LLAMACPP_PYTHON"
MAX_TOKENS = 24
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4, 5,"]
# Largest |logit| difference llama.cpp vs transformers allowed on the first step (measured 2026-12-01):
# f32: llama.cpp sums in another order: <= 6.5e-4 on the tiny models (logits ~2); the same GGUFs without
#      the q/k permutation: 0.07 .. 0.17; the llama3-rope one without rope_freqs: 0.014 .. 0.034.
# f16: ggml's CPU dot products also round the activations to f16: 0.034 on SmolLM2-135M; without the
#      permutation: 5 .. 18.
LOGIT_TOL = {"f32": 5e-3, "f16": 0.1}
MIN_COMPARED = 0.5  # at least half of all generated tokens must fall before any near-tie


@pytest.fixture(scope="session")
def llamacpp_python() -> Path:
    path = Path(os.environ.get(PYTHON_ENV) or ROOT / ".venv-llamacpp" / "bin" / "python")
    if not path.exists():
        unavailable(f"no llama.cpp venv at {path}: run `make gguf-llamacpp` (builds llama-cpp-python 0.3.36)")
    probe = subprocess.run([str(path), "-c", "import llama_cpp"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        unavailable(f"{path} cannot import llama_cpp: {probe.stderr.strip().splitlines()[-1:]}")
    return path


def run_llamacpp(python: Path, job: dict, tmp: Path) -> dict:
    src, dst = tmp / "llamacpp-in.json", tmp / "llamacpp-out.json"
    src.write_text(json.dumps({"threads": 2, **job}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run([str(python), str(RUNNER), str(src), str(dst)], env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"llama.cpp runner exited {proc.returncode}:\n{proc.stderr[-3000:]}", pytrace=False)
    return json.loads(dst.read_text())


def reference(model_dir: Path, outtype: str):
    """The original HF model with its matrices rounded as the GGUF stores them (computed in torch)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(rounded(p, outtype))
    return model


def transformers_greedy(model, ids: list[int], eos: int) -> tuple[list[int], list[float], torch.Tensor]:
    """Greedy tokens (stopping at eos, like the runner), the top-1 minus top-2 logit per step, first logits."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, eos_token_id=eos, pad_token_id=eos)
    tokens = out.sequences[0, len(ids):].tolist()
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return tokens, margins, out.scores[0][0]


def compare_greedy(model, tokenizer, prompts: list[list[int]], result: dict, tol: float) -> dict:
    """Assert llama.cpp's first-step logits within ``tol`` of transformers', and its greedy tokens equal
    transformers' up to the first near-tie: a step whose top-2 margin is under 4x the logit difference
    measured for that prompt (two logits each off by that much, with room for drift over the steps; past
    it a flip is numerics, not a bug). Returns counts for the report."""
    compared = total = identical = 0
    worst = 0.0
    for ids, got in zip(prompts, result["greedy"], strict=True):
        tokens, margins, first = transformers_greedy(model, ids, tokenizer.eos_token_id)
        diff = (first - torch.tensor(got["logits"])).abs().max().item()
        worst = max(worst, diff)
        assert diff <= tol, f"{tokenizer.decode(ids)!r}: first-step logits differ by {diff:.3g} > {tol}"
        clear = next((i for i, m in enumerate(margins) if m < 4 * diff), len(margins))
        assert got["tokens"][:clear] == tokens[:clear], (tokenizer.decode(ids), got["tokens"], tokens)
        compared, total = compared + clear, total + len(tokens)
        identical += got["tokens"] == tokens
    assert compared >= MIN_COMPARED * total, f"only {compared}/{total} tokens had a clear greedy choice"
    return {"max_logit_diff": worst, "compared": compared, "total": total, "identical_prompts": identical}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, llamacpp_python) -> dict:
    """SmolLM2-135M-Instruct (the demo model) → f16 GGUF → one llama.cpp run for every check below."""
    from nemo_automodel.demo.assets import smollm2_hf_dir

    src = smollm2_hf_dir()
    tmp = tmp_path_factory.mktemp("smollm2-gguf")
    path = convert(src, tmp / "smollm2-135m-instruct-f16.gguf", "f16")
    tok = AutoTokenizer.from_pretrained(src)
    chat_prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    prompts = [tok(p).input_ids for p in PROMPTS + chat_prompts]
    result = run_llamacpp(llamacpp_python, {"gguf": str(path), "prompts": prompts, "max_tokens": MAX_TOKENS,
                                            "texts": TEXTS + chat_prompts, "chats": CHATS}, tmp)
    return {"src": src, "tokenizer": tok, "prompts": prompts, "result": result, "texts": TEXTS + chat_prompts}


def test_smollm2_f16_greedy_matches_transformers(smollm2):
    tok = smollm2["tokenizer"]
    stats = compare_greedy(reference(smollm2["src"], "f16"), tok, smollm2["prompts"], smollm2["result"],
                           LOGIT_TOL["f16"])
    print(f"SmolLM2 f16 in llama.cpp: {stats}")
    paris = smollm2["result"]["greedy"][-1]["tokens"]  # the chat question about France, default system prompt
    assert "Paris" in tok.decode(paris) and paris[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_smollm2_tokenizer_and_chat_template_in_llamacpp(smollm2):
    tok, result = smollm2["tokenizer"], smollm2["result"]
    for text, ids in zip(smollm2["texts"], result["tokenized"], strict=True):
        assert ids == tok(text).input_ids, text
    assert result["chat_template"] == tok.chat_template
    assert result["chat_format"] == "chat_template.default"  # create_chat_completion renders the embedded template
    assert (result["bos"], result["eos"]) == (tok.bos_token, tok.eos_token)
    for chat, rendered in zip(CHATS, result["rendered"], strict=True):
        assert rendered == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("arch", [*ARCHS, "llama3"])
def test_tiny_f32_matches_transformers_in_llamacpp(arch, llamacpp_python, tokenizer_dir, tmp_path):
    src = build_tiny(arch, tmp_path / f"tiny-{arch}", tokenizer_dir)
    path = convert(src, tmp_path / "gguf" / f"tiny-{arch}-f32.gguf", "f32")
    tok = AutoTokenizer.from_pretrained(src)
    prompts = [tok(p).input_ids for p in PROMPTS]
    result = run_llamacpp(llamacpp_python, {"gguf": str(path), "prompts": prompts, "max_tokens": MAX_TOKENS,
                                            "texts": TEXTS}, tmp_path)
    stats = compare_greedy(reference(src, "f32"), tok, prompts, result, LOGIT_TOL["f32"])
    print(f"tiny {arch} f32 in llama.cpp: {stats}")
    for text, ids in zip(TEXTS, result["tokenized"], strict=True):  # llama.cpp's gpt-2 / qwen2 pre-tokenizers
        assert ids == tok(text).input_ids, text
