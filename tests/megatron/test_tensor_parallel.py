"""TP=2 over two gloo processes equals TP=1: logits, the gathered weights, LoRA training losses and adapters, and
the weights after plain-SGD steps of the full model (where a wrong gradient scale would show)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_megatron import IDS, run_megatron

from nemo_automodel.megatron import MegatronGPTModel
from nemo_automodel.megatron.convert import hf_to_megatron
from tests.distributed.harness import assert_sgd_equal
from tests.helpers import train_losses

HERE = Path(__file__).parent


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tp2_equals_tp1(arch, megatron_model_factory, token_file, tmp_path):
    import transformers

    path = megatron_model_factory(arch)
    spec = {"model": str(path), "out": str(tmp_path), "data": str(token_file), "log_dir": str(tmp_path / "runs"),
            "tp": 2}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "tp_worker.py"), str(tmp_path / "spec.json")]
    # own session: on a timeout the workers go down with the agent instead of spinning on
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-4000:]

    from nemo_automodel.megatron import MegatronStrategy

    strategy = MegatronStrategy()
    strategy.setup("cpu")
    try:
        model = MegatronGPTModel(str(path))
        module = model.configure_model().eval()
        with torch.no_grad():
            tp1 = model.logits(module, {"input_ids": IDS})
    finally:
        strategy.teardown()
    tp2 = torch.load(tmp_path / "logits.pt")
    assert (tp2 - tp1).abs().max().item() < 1e-5

    hf = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
    gathered = torch.load(tmp_path / "state.pt")
    expected = hf_to_megatron(hf, model.config)
    assert {k for k in gathered} == set(expected)
    assert all(torch.equal(gathered[k], expected[k]) for k in expected)

    single = run_megatron(str(path), str(token_file), str(tmp_path / "runs"), "tp1", tp=1, lora=True)
    tp2_losses, tp1_losses = train_losses(tmp_path / "runs" / "tp"), train_losses(single)
    assert len(tp2_losses) == len(tp1_losses) == 4
    assert max(abs(a - b) / b for a, b in zip(tp2_losses, tp1_losses)) < 1e-5, (tp2_losses, tp1_losses)
    # both export the same PEFT adapter (TP shards gathered before conversion)
    a = _export(tmp_path / "runs" / "tp", "hf_adapter/adapter_model.safetensors")
    b = _export(single, "hf_adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    # 2 steps of Megatron's SGD (no momentum, weight decay or clipping) on the full model, compared by the
    # exported weights: AdamW's losses and adapters barely show a wrong gradient scale, these do
    single_sgd = run_megatron(str(path), str(token_file), str(tmp_path / "runs"), "tp1-sgd", tp=1, lora=False, sgd=True)
    got, ref = _export(tmp_path / "runs" / "tp-sgd", "model/model.safetensors"), _export(single_sgd, "model/model.safetensors")
    assert got.keys() == ref.keys()
    assert_sgd_equal(got, ref, hf, f"Megatron TP=2 {arch}")


def _export(run_dir: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "checkpoints" / "last" / name)
