"""GGUFs written by llama.cpp's converter (``export/gguf.py``) run in llama.cpp itself (llama-cpp-python in its own
venv, ``make gguf-llamacpp``): greedy tokens and first-step logits against transformers on the original weights,
for SmolLM2-135M-Instruct (the demo model: also tokenization and the chat template as llama-cpp-python renders
it) and tiny random models of every family ``gguf_support`` builds (f16; the older three and Llama 3.1 rope
scaling in f32 too).

The references never come from the GGUF: they are the original HF models, with the matrices the f16 file
stores in f16 rounded so in torch, so a layout mistake in the converter cannot cancel. Tiny models are given
fixed token ids (``prompt_ids``) and generate a fixed number of tokens (eos ignored). Quantized GGUFs are not
run here: they segfault in llama_decode on this CPU (FACTS.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from gguf_support import CHATS, FAMILIES, MORE_FAMILIES, TEXTS, build_tiny, prompt_ids, rounded
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_automodel.export.gguf import convert
from tests.helpers import unavailable

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "nemo_automodel" / "export" / "llamacpp_runner.py"
PYTHON_ENV = "NEMO_AUTOMODEL_LLAMACPP_PYTHON"
MAX_TOKENS = 24
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4, 5,"]
# Largest |logit| difference llama.cpp vs transformers allowed on the first step:
# f32: llama.cpp sums in another order (measured 2026-12-01 <= 6.5e-4 on tiny models with logits ~2);
# f16: ggml's CPU dot products also round the activations to f16 (0.034 measured on SmolLM2-135M).
LOGIT_TOL = {"f32": 5e-3, "f16": 0.1}
MIN_COMPARED = 0.5  # at least half of all generated tokens must come before llama.cpp and transformers part
ROUTER = "mlp.gate.weight"  # the MoE router: llama.cpp's converter keeps it (ffn_gate_inp) in f32
# Router logits closer than this between a token's k-th and (k+1)-th expert count as a tie: llama.cpp's f16 path
# moves the tiny models' logits by ~1e-3 (measured), enough to route such a token elsewhere. Seen: a tiny
# Qwen3-MoE prompt whose last token's 2nd and 3rd experts were 9.6e-6 apart in layer 0 gave first-step logits
# 1.39 apart in f16 (1.1e-3 in f32, which routes as transformers does).
ROUTER_TIE = 1e-3


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
    """The original HF model with its weights rounded as the GGUF stores them (computed in torch)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(ROUTER):
                p.copy_(rounded(p, outtype))
    return model


def check_stored_types(path: Path, outtype: str) -> None:
    """What ``reference`` assumes: every matrix in the GGUF has the outtype but the router, which is f32."""
    import gguf

    want = {"f32": "F32", "f16": "F16"}[outtype]
    for t in gguf.GGUFReader(path).tensors:
        expected = want if len(t.shape) > 1 and not t.name.endswith("ffn_gate_inp.weight") else "F32"
        assert t.tensor_type.name == expected, (t.name, t.tensor_type.name)


@contextlib.contextmanager
def router_gaps(model):
    """Record, per forward of a mixture-of-experts model, each token's smallest gap between the k-th and (k+1)-th
    router logit over its MoE layers (k = experts per token; a list of floats per forward, empty for dense models)."""
    k = getattr(model.config, "num_experts_per_tok", None)
    forwards: list[list[float]] = []
    current: list[torch.Tensor] = []

    def hook(module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        top = logits.reshape(-1, logits.shape[-1]).float().topk(k + 1, dim=-1).values
        current.append(top[:, k - 1] - top[:, k])

    handles = [m.register_forward_hook(hook) for name, m in model.named_modules() if k and name.endswith("mlp.gate")]

    def flush() -> None:
        forwards.append(torch.stack(current).amin(0).tolist() if current else [])
        current.clear()

    try:
        yield forwards, flush
    finally:
        for handle in handles:
            handle.remove()


def transformers_greedy(model, ids: list[int], steps: int, eos: int | None):
    """Greedy tokens (stopping at ``eos`` unless None, like the runner), the top-1 minus top-2 logit per step, the
    first step's logits, and per step the smallest router gap of every token read so far (inf for dense models)."""
    tokens: list[int] = []
    margins: list[float] = []
    with torch.no_grad(), router_gaps(model) as (forwards, flush):
        out = model(torch.tensor([ids]), use_cache=True)
        flush()
        first = out.logits[0, -1]
        for _ in range(steps):
            logits = out.logits[0, -1]
            top = logits.topk(2).values
            margins.append(float(top[0] - top[1]))
            tokens.append(int(logits.argmax()))
            if tokens[-1] == eos or len(tokens) == steps:
                break
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            flush()
    gaps, seen = [], float("inf")
    for forward in forwards:
        seen = min([seen, *forward])
        gaps.append(seen)
    return tokens, margins, first, gaps


def compare_greedy(label: str, model, prompts: list[list[int]], result: dict, tol: float, eos: int | None) -> dict:
    """Assert llama.cpp's first-step logits within ``tol`` of transformers', and its greedy tokens equal
    transformers' up to where they part, which must be a near-tie: a step whose top-2 margin is under 4x the
    logit difference measured for that prompt (two logits each off by that much, with room for drift over the
    steps; there a flip is numerics, not a bug), or, in a mixture-of-experts model, a step after a token whose
    router chose its k-th expert over the next by less than ``ROUTER_TIE`` (f16 noise may route it elsewhere; a
    prompt holding such a token skips the logit check). Tokens after a parting are not comparable and not
    counted. Returns counts for the report."""
    compared = total = identical = 0
    worst, notes = 0.0, []
    for ids, got in zip(prompts, result["greedy"], strict=True):
        tokens, margins, first, gaps = transformers_greedy(model, ids, MAX_TOKENS, eos)
        diff = (first - torch.tensor(got["logits"])).abs().max().item()
        if gaps[0] < ROUTER_TIE:
            notes.append(f"prompt of {len(ids)}: router tie {gaps[0]:.2g} in the prompt, first-step logit diff {diff:.3g}")
        else:
            worst = max(worst, diff)
            assert diff <= tol, f"{label}: first-step logits differ by {diff:.3g} > {tol}"
        same = next((i for i, (a, b) in enumerate(zip(got["tokens"], tokens)) if a != b), min(len(got["tokens"]),
                                                                                             len(tokens)))
        if got["tokens"] != tokens:
            assert same < len(tokens), (label, ids, got["tokens"], tokens)  # llama.cpp ran on past transformers' eos
            tie = margins[same] < 4 * diff or gaps[same] < ROUTER_TIE
            assert tie, (f"{label}: tokens part at step {same} without a near-tie (margin {margins[same]:.3g}, logit "
                         f"diff {diff:.3g}, router gap {gaps[same]:.3g})", ids, got["tokens"], tokens)
            notes.append(f"prompt of {len(ids)}: parts at step {same} (margin {margins[same]:.3g}, logit diff "
                         f"{diff:.3g}, router gap {gaps[same]:.3g})")
        compared, total = compared + same, total + len(tokens)
        identical += got["tokens"] == tokens
    stats = {"max_logit_diff": worst, "compared": compared, "total": total, "identical_prompts": identical,
             "prompts": len(prompts), "notes": notes}
    print(f"PARITY {label}: {stats}")
    assert compared >= MIN_COMPARED * total, f"{label}: tokens parted early: only {compared}/{total} compared"
    return stats


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
    compare_greedy("smollm2-135m f16", reference(smollm2["src"], "f16"), smollm2["prompts"], smollm2["result"],
                   LOGIT_TOL["f16"], tok.eos_token_id)
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


CASES = [(family, "f16") for family in FAMILIES] + [(family, "f32") for family in ["llama", *MORE_FAMILIES]]


@pytest.mark.parametrize("family, outtype", CASES)
def test_tiny_family_matches_transformers_in_llamacpp(family, outtype, llamacpp_python, tokenizer_dir, tmp_path):
    src = build_tiny(family, tmp_path / f"tiny-{family}", tokenizer_dir)
    path = convert(src, tmp_path / "gguf" / f"tiny-{family}-{outtype}.gguf", outtype)
    check_stored_types(path, outtype)
    prompts = prompt_ids(family)
    result = run_llamacpp(llamacpp_python, {"gguf": str(path), "prompts": prompts, "max_tokens": MAX_TOKENS,
                                            "ignore_eos": True}, tmp_path)
    stats = compare_greedy(f"tiny {family} {outtype}", reference(src, outtype), prompts, result, LOGIT_TOL[outtype],
                           None)
    if outtype == "f16":  # the same tokens against the unrounded fp32 model, for the report
        plain = compare_greedy(f"tiny {family} f16 vs fp32 weights", reference(src, "f32"), prompts, result,
                               LOGIT_TOL[outtype], None)
        print(f"PARITY tiny {family}: f16 file vs rounded {stats['identical_prompts']}/{stats['prompts']}, vs fp32 "
              f"{plain['identical_prompts']}/{plain['prompts']} prompts identical")
