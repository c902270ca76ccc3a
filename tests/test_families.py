"""The mixture-of-experts and state-space/hybrid families of issue 24 (tiny random Qwen3-MoE, Mixtral,
DeepSeek-V3, Mamba2, Nemotron-H; ``TINY_FAMILIES``) fine-tuned end to end through ``llm.api.finetune`` on four
chats of the real SmolLM2 tokenizer: LoRA with the recipe's default targets and full SFT overfit them; the saved
adapter holds the experts' LoRA tensors and the merged export computes what the adapter on its base computes.

(2 FSDP2 ranks equal one process and SIGKILL resume: ``tests/distributed/test_moe.py``.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import fiddle as fdl
import pytest
import torch

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.errors import ConfigError
from nemo_automodel.peft import LoRA
from recipes.hf_auto_model_for_causal_lm import lora as recipe_lora
from tests.helpers import chat_dataset, metrics, train_losses

pytestmark = pytest.mark.slow  # ten trainings of 12 steps on a 49k vocabulary

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "mamba2", "nemotron_h"]
MOE_LAYERS = {"qwen3_moe": [0, 1], "mixtral": [0, 1], "deepseek_v3": [1]}  # with routed experts (DeepSeek: 0 dense)
ROUTER_AUX = {"qwen3_moe", "mixtral"}  # families whose config carries router_aux_loss_coef (DeepSeek-V3: none)
STEPS = 12  # every step sees the same four chats (one micro-batch of 4)


def _finetune(path: Path, tmp_path: Path, peft: LoRA | None, lr: float) -> tuple[torch.nn.Module, Path, list[float]]:
    """``(trained module, run dir, losses)`` of ``STEPS`` AdamW steps at a flat ``lr``."""
    chats = chat_dataset(repeat=1).select(range(4))
    model = llm.HFAutoModelForCausalLM(str(path))
    run_dir = llm.api.finetune(
        model=model, peft=peft,
        data=llm.HFDatasetDataModule(chats, formatting="chat", seq_length=64, micro_batch_size=4, global_batch_size=4),
        optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=lr)),
        trainer=nl.Trainer(max_steps=STEPS, log_every_n_steps=1, enable_progress_bar=False, accelerator="cpu",
                           enable_checkpointing=peft is not None),
        log=nl.NeMoLogger(log_dir=str(tmp_path), name="run", tensorboard=False))
    losses = train_losses(run_dir)
    assert len(losses) == STEPS, losses
    return model.model, run_dir, losses


def _with_trained_head_scale(path: Path, out: Path) -> Path:
    """The tiny model with its (untied) output layer x10. A random head (std 0.02, hidden 64) gives logits within
    about +-1.3, so no adapter on the frozen model can bring the loss far below ln(49152) = 10.8; a trained
    model's head spans logits of order 10 (as tests/vlm/test_vlm_training.py does)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    head = model.get_output_embeddings().weight
    assert head is not model.get_input_embeddings().weight
    with torch.no_grad():
        head.mul_(10)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", FAMILIES)
def test_full_sft_overfits_four_chats(arch, tiny_model_factory, tmp_path):
    _, _, losses = _finetune(tiny_model_factory(arch), tmp_path, None, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses  # measured 0.03-0.28


@pytest.mark.parametrize("arch", FAMILIES)
def test_lora_with_the_recipe_targets_overfits_and_the_merged_export_equals_adapter_on_base(arch, tiny_model_factory,
                                                                                            tmp_path):
    """The recipe's LoRA (its targets, rank and alpha) overfits four chats; a mixture-of-experts model's saved
    adapter holds trained LoRA tensors for both fused expert weights of every MoE layer (vLLM's LoRA serving cannot
    load them: adapter export is refused in one line); every adapted layer is saved, trained; the merged export's
    logits equal those of the trained adapter on its base within fp32 rounding."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from nemo_automodel.export import export

    base = _with_trained_head_scale(tiny_model_factory(arch), tmp_path / "base")
    peft = fdl.build(recipe_lora())  # ["*_proj", "linear_qkv"], rank 16, alpha 32
    assert isinstance(peft, LoRA) and peft.dropout == 0  # peft has no LoRA dropout on fused experts
    trained, run_dir, losses = _finetune(base, tmp_path, peft, lr=5e-3)
    assert losses[-1] < 0.5 * losses[0], losses  # measured 0.10-0.21
    assert losses[-1] < 0.5 * math.log(49152), losses  # and well under a uniform guess (Mamba2 starts at 37)
    aux = [r.get("router_aux_loss") for r in metrics(run_dir) if "train_loss" in r]  # logged beside the loss
    if arch in ROUTER_AUX:  # top-2 of 4 experts: 2 when balanced, <= 4
        assert all(a is not None and 0 < a <= 4 for a in aux), aux
    else:
        assert aux == [None] * STEPS, aux

    adapter = run_dir / "checkpoints" / "last" / "hf_adapter"
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        saved = {k.removeprefix("base_model.model."): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    experts = {k: t for k, t in saved.items() if ".experts." in k}
    target_parameters = json.loads((adapter / "adapter_config.json").read_text()).get("target_parameters") or []
    if arch in MOE_LAYERS:
        trained_b = [k for k, t in experts.items() if "lora_B" in k and t.abs().sum() > 0]
        # peft nests the two wrappers of a layer's experts (``experts.lora_B``, ``experts.base_layer.lora_B``)
        assert len(trained_b) == 2 * len(MOE_LAYERS[arch]), sorted(experts)
        assert sorted(target_parameters) == sorted(f"model.layers.{i}.mlp.experts.{w}" for i in MOE_LAYERS[arch]
                                                   for w in ("gate_up_proj", "down_proj")), target_parameters
        with pytest.raises(ConfigError, match=r"LoRA on fused expert weights, which vLLM's LoRA serving does not "
                                              r"load; export mode='merged'"):
            export(run_dir / "checkpoints" / "last", tmp_path / "adapter", mode="adapter")
    else:
        assert not experts and not target_parameters

    # every layer that trained is in the adapter (peft's transformers-4 conversion drops DeepSeek's dense MLP and
    # shared experts unless told not to: nemo_automodel/peft/lora.py), with lora_B moved off its zero init
    saved_b = {k.split(".lora_B")[0] for k, t in saved.items() if "lora_B" in k and t.abs().sum() > 0}
    adapted = {n.removeprefix("base_model.model.").split(".lora_B")[0] for n, _ in trained.named_parameters()
               if "lora_B" in n}
    assert saved_b == adapted, sorted(saved_b ^ adapted)
    if arch == "deepseek_v3":
        assert {n.split(".mlp.")[1] for n in saved_b if ".mlp." in n} >= {
            "gate_proj", "down_proj", "shared_experts.up_proj", "shared_experts.down_proj", "experts"}, sorted(saved_b)

    merged_dir = export(run_dir / "checkpoints" / "last", tmp_path / "merged", mode="merged")
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
        assert not any("lora" in k for k in merged.state_dict())
        merged_logits = merged.eval()(input_ids=ids).logits
        on_base = trained.eval()(input_ids=ids, use_cache=False).logits  # the adapter on its base, as trained
    # logits of order 10 (the head x10): fp32 rounding of W + BA against W x + B(A x)
    assert torch.allclose(merged_logits, on_base, atol=1e-4, rtol=1e-5), (merged_logits - on_base).abs().max()
