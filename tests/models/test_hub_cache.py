"""A Hub model id, not a folder: both backends load it offline from a real Hugging Face cache layout.

The cache is written in huggingface_hub's on-disk format (``models--org--name/refs/main`` ->
``snapshots/<commit>/``); the loaders run in a subprocess because huggingface_hub reads
``HF_HUB_CACHE`` when it is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import require_module

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SCRIPT = """
import json, torch, transformers
from nemo_automodel.models import HFAutoModelForCausalLM
ids = torch.arange(2 * 12).reshape(2, 12) * 37 % 500 + 3
ref = transformers.AutoModelForCausalLM.from_pretrained({local!r}, dtype=torch.float32).eval()
with torch.no_grad():
    want = ref(input_ids=ids, use_cache=False).logits
    hf = HFAutoModelForCausalLM("test-org/tiny-llama").configure_model("cpu").eval()
    out = {{"hf": (hf(input_ids=ids, use_cache=False).logits - want).abs().max().item()}}
from nemo_automodel.megatron import MegatronGPTModel, MegatronStrategy
from nemo_automodel.megatron.hf_checkpoint import checkpoint_folder
strategy = MegatronStrategy()
strategy.setup("cpu")
model = MegatronGPTModel("test-org/tiny-llama")
with torch.no_grad():
    out["megatron"] = (model.logits(model.configure_model().eval(), {{"input_ids": ids}}) - want).abs().max().item()
out["read_from"] = str(checkpoint_folder("test-org/tiny-llama"))
strategy.teardown()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture
def hub_cache(tmp_path, tiny_llama) -> Path:
    repo = tmp_path / "hub" / "models--test-org--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(tiny_llama, repo / "snapshots" / COMMIT)
    return tmp_path / "hub"


def test_a_hub_id_loads_offline_from_the_cache_on_both_backends(hub_cache, tiny_llama):
    require_module("megatron.core", "megatron-core is installed by make venv (--no-deps)")
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(local=str(tiny_llama))], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["hf"] < 1e-6
    assert out["megatron"] < 1e-5
    assert out["read_from"] == str(hub_cache / "models--test-org--tiny-llama" / "snapshots" / COMMIT)
    assert "loading it with transformers" not in proc.stderr  # the safetensors were streamed, no fallback
