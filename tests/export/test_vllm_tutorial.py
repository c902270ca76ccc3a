"""tutorials/vllm_deploy.py runs end to end against the real vLLM venv (on the fine-tuned tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from export_support import ROOT


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_deploy_tutorial(vllm_python, sft_export, tmp_path):
    cmd = [sys.executable, str(ROOT / "tutorials" / "vllm_deploy.py"), "--model", str(sft_export), "--max-steps", "4",
           "--samples", "32", "--lr", "1e-2", "--out", str(tmp_path), "--python", str(vllm_python)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    out = proc.stdout
    assert "3/3 replies equal token for token" in out, out
    replies = json.loads((tmp_path / "vllm-replies.json").read_text())  # the token ids behind that line
    assert len(replies) == 3 and all(r["prompt_token_ids"] and r["transformers"] for r in replies), replies
    for reply in replies:  # greedy transformers+peft, vLLM with the LoRARequest and vLLM on the merged export
        assert reply["transformers"] == reply["vllm_adapter"] == reply["vllm_merged"], reply
    assert "ConfigError: checkpoint=" in out and "is incomplete (no meta.json)" in out, out
    assert f"make serve EXPORT={tmp_path / 'vllm-adapter'}" in out and "--enable-lora" in out, out
