"""DoRA and rank-stabilised LoRA on the HF path: they train, export merged, and vLLM serving refuses DoRA."""

from __future__ import annotations

import json
from pathlib import Path

import fiddle as fdl
import pytest
import torch
from helpers import chat_dataset, train_losses

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.errors import ConfigError
from nemo_automodel.export import export

STEPS = 12


def _train(model_dir: Path, log_dir: Path, name: str, peft, devices: int = 1, strategy=None) -> Path:
    return llm.api.finetune(
        model=llm.HFAutoModelForCausalLM(str(model_dir)), peft=peft,
        data=llm.HFDatasetDataModule(chat_dataset(), formatting="chat", seq_length=64, micro_batch_size=4,
                                     global_batch_size=8, shuffle=False),
        optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=1e-2)),
        trainer=nl.Trainer(max_steps=STEPS, log_every_n_steps=1, enable_progress_bar=False, devices=devices,
                           strategy=strategy, precision="32"),  # compared with one process to 1e-5
        log=nl.NeMoLogger(log_dir=str(log_dir), name=name),
    )


@pytest.fixture(scope="module")
def dora_run(tiny_llama, tmp_path_factory) -> Path:
    return _train(tiny_llama, tmp_path_factory.mktemp("dora"), "dora", llm.peft.DoRA(target_modules=["*_proj"], dim=4))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_dora_trains_its_magnitudes(dora_run, tiny_llama):
    from safetensors.torch import load_file

    losses = train_losses(dora_run)
    assert losses[-1] < losses[0] - 0.5, losses
    adapter = dora_run / "checkpoints" / "last" / "hf_adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    weights = load_file(adapter / "adapter_model.safetensors")
    magnitudes = {k: v for k, v in weights.items() if "lora_magnitude_vector" in k}
    assert len(magnitudes) == 2 * 7  # one per adapted projection: 2 layers x 7
    # DoRA's magnitude starts at the base weight's row norms; training must have moved it
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    key = next(k for k in magnitudes if "layers.0.self_attn.q_proj" in k)
    init = base.model.layers[0].self_attn.q_proj.weight.norm(dim=1)
    assert (magnitudes[key] - init).abs().max() > 1e-3


def test_dora_merged_export_equals_adapter_on_base(dora_run, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = export(dora_run, tmp_path / "merged", mode="merged")
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = _logits(AutoModelForCausalLM.from_pretrained(merged_dir), ids)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                        dora_run / "checkpoints" / "last" / "hf_adapter")
    on_base = _logits(adapter, ids)
    assert (merged - on_base).abs().max() < 1e-4 * on_base.abs().max()
    plain = _logits(AutoModelForCausalLM.from_pretrained(tiny_llama), ids)
    assert (on_base - plain).abs().max() > 1e-2  # the adapter changes the model: the comparison means something


def test_vllm_serving_refuses_dora_in_one_line_before_vllm(dora_run, tmp_path):
    with pytest.raises(ConfigError, match="cannot be served by vLLM: .*DoRA") as err:
        export(dora_run, tmp_path / "adapter", mode="adapter")
    assert "\n" not in str(err.value) and not (tmp_path / "adapter").exists()


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = llm.peft.LoRA(target_modules=["q_proj"], dim=16, alpha=8, use_rslora=True)
    assert lora.scaling == 2.0  # 8 / sqrt(16), where plain LoRA would scale by 0.5
    model = lora.apply(AutoModelForCausalLM.from_pretrained(tiny_llama))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0
    run = _train(tiny_llama, tmp_path, "rslora", lora)
    adapter = run / "checkpoints" / "last" / "hf_adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_rslora"] is True
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter)
    assert reloaded.base_model.model.model.layers[1].self_attn.q_proj.scaling["default"] == 2.0
    export(run, tmp_path / "adapter", mode="adapter")  # vLLM serves rsLoRA: the static check lets it through


def test_the_megatron_swap_refuses_dora():
    import nemo_run as run

    from nemo_automodel.megatron.swap import to_megatron
    from recipes.hf_auto_model_for_causal_lm import finetune_recipe

    recipe = finetune_recipe(model_id="/nonexistent")
    recipe.peft = run.Config(llm.peft.DoRA, dim=8)
    with pytest.raises(ConfigError, match="DoRA"):
        to_megatron(recipe)
    recipe.peft = run.Config(llm.peft.LoRA, dim=8, use_dora=True)
    with pytest.raises(ConfigError, match="DoRA"):
        to_megatron(recipe)


@pytest.mark.slow
@pytest.mark.distributed
def test_dora_on_fsdp2_matches_one_process(dora_run, tiny_llama, tmp_path):
    """DoRA's magnitude reads the whole base weight: under FSDP2 (2 gloo ranks) the layer's weights are
    gathered in its forward, so the run equals the single-process one: its losses and its saved adapter.
    (A wrong gradient scale barely shows under AdamW: plain-SGD DoRA steps on FSDP2 are compared by weights
    in tests/distributed/test_parallel.py.)"""
    from safetensors.torch import load_file

    fsdp2 = _train(tiny_llama, tmp_path, "dora-fsdp2", llm.peft.DoRA(target_modules=["*_proj"], dim=4), devices=2,
                   strategy="fsdp2")
    got, ref = train_losses(fsdp2), train_losses(dora_run)
    assert len(got) == len(ref) == STEPS
    assert max(abs(a - b) / b for a, b in zip(got, ref)) < 1e-5, (got, ref)
    a, b = (load_file(run / "checkpoints" / "last" / "hf_adapter" / "adapter_model.safetensors") for run in (fsdp2, dora_run))
    assert a.keys() == b.keys() and any("lora_magnitude_vector" in k for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"DoRA adapter after {STEPS} AdamW steps, FSDP2 (2 ranks) vs one process: max difference {diff:.2e}")
    assert diff < 1e-5  # measured 0.0 (gloo, CPU)
