"""The tutorials run end to end as scripts (on tiny models) and parse as percent-format notebooks."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import require_module, train_losses

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"


def run_tutorial(script: str, model: Path, out: Path, *extra: str) -> str:
    """Run ``tutorials/<script>`` quickly on ``model``; return its stdout (fails with its output tail)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(TUTORIALS / script), "--model", str(model), "--max-steps", "4", "--samples", "32",
           "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.slow
def test_peft_lora_tutorial(tiny_model_factory, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tiny = tiny_model_factory("llama")
    out = tmp_path / "out"
    stdout = run_tutorial("peft_lora.py", tiny, out, "--lr", "1e-2")

    # target resolution was shown on the loaded model: 7 projections x 2 layers, and a bad list fails
    assert "selected 14 layers in all" in stdout
    assert "ConfigError: LoRA target_modules=['wq', 'wk']" in stdout and "self_attn.q_proj" in stdout

    api_run, recipe_run = out / "lora-api", out / "lora-recipe"
    losses = train_losses(api_run)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, losses
    # the recipe graph is the same job: its 3 steps retrace the first 3 losses
    assert train_losses(recipe_run) == pytest.approx(losses[:3], abs=1e-6)
    adapter = api_run / "checkpoints" / "last" / "hf_adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    assert len(weights) == 2 * 14 and all("lora_A" in k or "lora_B" in k for k in weights), sorted(weights)

    ids = torch.randint(0, 1000, (2, 12))
    base_logits = logits(AutoModelForCausalLM.from_pretrained(tiny), ids)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), adapter)
    tuned_logits = logits(tuned, ids)
    assert (tuned_logits - base_logits).abs().max() > 1e-3  # the adapter learned something

    merged = AutoModelForCausalLM.from_pretrained(out / "lora-merged")
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, ids), tuned_logits, atol=1e-4, rtol=0)
    assert "max |logit difference| merged vs. base+adapter" in stdout and "after:" in stdout


@pytest.mark.slow
def test_sft_tutorial(tiny_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = tiny_model_factory("qwen2")
    out = tmp_path / "out"
    stdout = run_tutorial("sft.py", tiny, out, "--lr", "1e-3")

    run_dir = out / "sft-api"
    losses = train_losses(run_dir)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, losses
    gap = re.search(r"reloaded model vs\. trained model: max \|logit difference\| (\S+)", stdout)
    assert gap and float(gap.group(1)) == 0.0, stdout  # the saved HF folder is the trained model, bit for bit

    saved = run_dir / "checkpoints" / "last" / "model"
    tuned = AutoModelForCausalLM.from_pretrained(saved)
    assert AutoTokenizer.from_pretrained(saved).chat_template
    base = AutoModelForCausalLM.from_pretrained(tiny).state_dict()
    changed = [k for k, w in tuned.state_dict().items() if not torch.equal(w, base[k])]
    assert len(changed) > len(base) // 2, f"only {len(changed)} of {len(base)} tensors changed"
    assert "after:" in stdout
    assert not (out / "sft-recipe").exists()  # building the recipe graph wrote nothing


# -- notebook structure (fast) ------------------------------------------------------------
def percent_cells(path: Path) -> list[tuple[str, str]]:
    """Split a jupytext percent-format script into ``(cell_type, source)`` pairs."""
    cells: list[tuple[str, list[str]]] = []
    for line in path.read_text().splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
        else:
            assert not line.strip(), f"{path.name}: text before the first cell: {line!r}"
    return [(kind, "\n".join(lines).strip("\n")) for kind, lines in cells]


@pytest.mark.parametrize("script", ["peft_lora.py", "sft.py"])
def test_tutorial_is_a_percent_notebook(script):
    import nbformat

    path = TUTORIALS / script
    cells = percent_cells(path)
    kinds = [kind for kind, _ in cells]
    assert kinds[0] == "markdown" and kinds.count("markdown") >= 6 and kinds.count("code") >= 6
    for kind, source in cells:
        assert source.strip(), f"{script}: empty {kind} cell"
        if kind == "markdown":
            assert all(line.startswith("#") for line in source.splitlines()), f"{script}: bare text in markdown"
        else:
            ast.parse(source)
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("\n".join(line[2:] for line in src.splitlines())) if kind == "markdown"
        else nbformat.v4.new_code_cell(src) for kind, src in cells])
    nbformat.validate(nb)
    assert len(path.read_text().splitlines()) < 400


@pytest.mark.slow
def test_backend_swap_tutorial(tiny_model_factory, tmp_path):
    require_module("megatron.core", "the megatron extra is not installed")
    stdout = run_tutorial("backend_swap.py", tiny_model_factory("llama"), tmp_path / "out", "--lr", "1e-2")
    assert "to_automodel(to_megatron(recipe)) == recipe: True" in stdout
    graphs = {name: (tmp_path / "out" / f"swap-{name}.yaml").read_text()
              for name in ("recipe", "megatron", "round-trip")}
    assert graphs["round-trip"] == graphs["recipe"] != graphs["megatron"]
    assert "HFAutoModelForCausalLM" in graphs["recipe"] and "max_steps: 4" in graphs["recipe"]
    assert "MegatronGPTModel" in graphs["megatron"]
    assert "MegatronGPTModel" in stdout and "tensor_model_parallel_size = 1" in stdout
    losses = {line.split()[0]: [float(x) for x in line.split(":")[1].split()]
              for line in stdout.splitlines() if line.split()[:1] in (["automodel"], ["megatron"])}
    auto, megatron = losses["automodel"], losses["megatron"]
    assert len(auto) == len(megatron) == 4
    assert abs(auto[0] - megatron[0]) / auto[0] < 1e-5  # same weights, same first batch
    assert megatron[-1] < megatron[0]
    assert "adapter layers: ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']" in stdout
