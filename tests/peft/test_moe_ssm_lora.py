"""LoRA on the model families of 2025-26: the fused expert weights of mixture-of-experts models (3-D parameters,
adapted through peft's ``target_parameters``) and Mamba/hybrid models (the mixer's ``in_proj``: peft refuses
its ``out_proj``), with one line per kind of what is adapted."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.errors import ConfigError
from nemo_automodel.peft import LoRA
from recipes.hf_auto_model_for_causal_lm import LORA_TARGETS
from tests.conftest import TINY_FAMILIES
from tests.helpers import chat_dataset

EXPERTS = "experts: 4 of 4 fused weights (gate_up_proj, down_proj)"
ATTENTION = "attention: {} of {} layers (q_proj, k_proj, v_proj, o_proj)"


def _model(arch: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(TINY_FAMILIES[arch](128))


@pytest.mark.parametrize(("arch", "kinds"), [
    ("qwen3_moe", {ATTENTION.format(8, 8), EXPERTS}),
    ("mixtral", {ATTENTION.format(8, 8), EXPERTS}),
    ("deepseek_v3", {"attention: 10 of 10 layers (q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj)",
                     "MLP: 3 of 3 layers (gate_proj, up_proj, down_proj)",
                     "shared experts: 3 of 3 layers (gate_proj, up_proj, down_proj)",
                     "experts: 2 of 2 fused weights (gate_up_proj, down_proj)"}),
    ("mamba2", {"SSM: 2 of 4 layers (in_proj)"}),
    ("nemotron_h", {ATTENTION.format(4, 4), "MLP: 2 of 2 layers (up_proj, down_proj)", "SSM: 2 of 4 layers (in_proj)"}),
])
def test_the_recipes_default_targets_adapt_every_kind_the_family_has(arch, kinds, capsys, caplog):
    """The recipe's ``["*_proj", "linear_qkv"]`` runs on every family with no edit; the printed lines say what
    trains, and the gradient reaches every adapter that starts at zero output (lora_B)."""
    with caplog.at_level(logging.WARNING, logger="nemo_automodel.peft.targets"):
        model = LoRA(target_modules=LORA_TARGETS, dim=4).apply(_model(arch))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"LoRA r=4 on {type(model.get_base_model()).__name__}:"
    assert {line.strip() for line in out[1:]} == kinds
    if arch in ("mamba2", "nemotron_h"):  # *_proj also reaches the mixer's out_proj, which peft refuses
        assert f"leaves out {'backbone' if arch == 'mamba2' else 'model'}.layers.*.mixer.out_proj" in caplog.text
        assert f"peft cannot adapt out_proj in {arch} models" in caplog.text
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b.values()), \
        [n for n, p in lora_b.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert any(".experts." in n for n in lora_b) == ("experts" in str(kinds))
    # as many layers and fused weights carry adapters as the lines say (peft's transformers-4 conversion, unless
    # switched off, drops DeepSeek-V3's dense MLP and shared experts after they were printed)
    wrapped = {n.split(".lora_")[0] for n in lora_b}
    fused = {n for n in wrapped if n.endswith((".experts", ".experts.base_layer"))}
    said = {"layers": 0, "fused weights": 0}
    for line in kinds:
        count, what = re.fullmatch(r".*: (\d+) of \d+ (layers|fused weights).*", line).groups()
        said[what] += int(count)
    assert (len(wrapped - fused), len(fused)) == (said["layers"], said["fused weights"]), sorted(wrapped)


def test_a_target_peft_refuses_or_that_matches_nothing_is_one_line():
    with pytest.raises(ConfigError) as err:
        LoRA(target_modules=["out_proj"]).apply(_model("mamba2"))
    assert "\n" not in str(err.value)
    assert "LoRA target 'out_proj' reaches only backbone.layers.*.mixer.out_proj of Mamba2ForCausalLM, and peft " \
           "cannot adapt out_proj in mamba2 models" in str(err.value)
    with pytest.raises(ConfigError, match=r"target_modules=\['experts'\] .* match no layer of NemotronHForCausalLM"):
        LoRA(target_modules=["experts"]).apply(_model("nemotron_h"))
    with pytest.raises(ConfigError, match="peft has no DoRA for fused expert weights"):
        LoRA(target_modules=["experts"], use_dora=True).apply(_model("qwen3_moe"))
    with pytest.raises(ConfigError, match=r"^dropout=0.1: peft has no LoRA dropout for fused expert weights "
                                          r"\(model.layers.\*.mlp.experts.gate_up_proj, model.layers.\*.mlp.experts."
                                          r"down_proj\); set dropout=0, or exclude_modules=\['experts'\]$"):
        LoRA(target_modules=LORA_TARGETS, dropout=0.1).apply(_model("deepseek_v3"))


def test_experts_alone_and_excluded():
    """``experts`` names the fused weights by their module; ``exclude_modules=["experts"]`` leaves them out."""
    only = LoRA(target_modules=["experts"], dim=4).apply(_model("qwen3_moe"))
    trained = {n.split(".lora_")[0] for n, p in only.named_parameters() if p.requires_grad}
    assert trained and all(".mlp.experts" in n for n in trained)
    without = LoRA(target_modules=["*_proj"], exclude_modules=["experts"], dim=4).apply(_model("qwen3_moe"))
    assert not any(".experts" in n for n, p in without.named_parameters() if p.requires_grad)


def _chat_batch(tokenizer, rows: int = 2) -> dict[str, torch.Tensor]:
    from nemo_automodel.data.collate import collate

    texts = [tokenizer(t)["input_ids"] for t in ("The router sends each token to two experts.",
                                                    "Mixture of experts, top-2 routing, four experts in all.")][:rows]
    return collate([{"input_ids": ids[:-1], "labels": ids[1:], "loss_mask": [1.0] * (len(ids) - 1)} for ids in texts],
                   pad_token_id=0)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_router_aux_loss_equals_transformers_and_reaches_the_router(arch, tiny_model_factory, tokenizer):
    """Our loss for one micro-batch, divided by its loss tokens, is transformers' own ``loss`` with
    ``output_router_logits`` (cross-entropy + router_aux_loss_coef x load-balancing loss, padding masked);
    the term's gradient reaches the router; ``router_aux_loss_coef=0`` removes it."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory(arch)
    batch = _chat_batch(tokenizer)
    mask = (torch.arange(batch["input_ids"].shape[1]) < batch["num_tokens"][:, None]).long()
    labels = torch.where(batch["loss_mask"] > 0, batch["labels"], -100)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    assert hf.config.router_aux_loss_coef > 0
    theirs = hf(input_ids=batch["input_ids"], attention_mask=mask, output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(theirs.logits.flatten(0, 1), labels.flatten(), reduction="mean")
    expected = ce + hf.config.router_aux_loss_coef * theirs.aux_loss
    for coef in (None, 0.0):
        model = llm.HFAutoModelForCausalLM(str(path), router_aux_loss_coef=coef)
        module = model.configure_model().train()
        ours = model.loss(module, batch) / batch["loss_mask"].sum()
        terms = model.loss_terms()
        if coef == 0.0:
            assert terms == {} and torch.allclose(ours, ce, rtol=1e-5), (ours, ce)
            continue
        assert torch.allclose(ours, expected, rtol=1e-5), (ours, expected)
        assert torch.allclose(terms["router_aux_loss"] / batch["loss_mask"].sum(), theirs.aux_loss.double(), rtol=1e-5)
        ours.backward()
        router = [p for n, p in module.named_parameters() if n.endswith("mlp.gate.weight")]
        assert router and all(p.grad is not None and p.grad.abs().sum() > 0 for p in router)
    with pytest.raises(ConfigError, match=r"router_aux_loss_coef=0.01 is invalid: LlamaConfig has no router"):
        llm.HFAutoModelForCausalLM(str(tiny_model_factory("llama")), router_aux_loss_coef=0.01).configure_model()


def test_packed_rows_on_a_state_space_model_are_refused_in_one_line(tiny_model_factory, tmp_path):
    """Mamba layers ignore position ids: a packed row would carry the scan state from one sample into the next."""
    with pytest.raises(ConfigError, match="Mamba2ForCausalLM has state-space .* set the data module's "
                                          "packed_sequence_size=0"):
        llm.api.finetune(
            model=llm.HFAutoModelForCausalLM(str(tiny_model_factory("mamba2"))),
            peft=LoRA(target_modules=LORA_TARGETS, dim=4),
            data=llm.HFDatasetDataModule(chat_dataset(), formatting="chat", seq_length=256, micro_batch_size=1,
                                         packed_sequence_size=256),
            trainer=nl.Trainer(max_steps=1, enable_progress_bar=False, accelerator="cpu"),
            log=nl.NeMoLogger(log_dir=str(tmp_path), name="mamba", tensorboard=False))
