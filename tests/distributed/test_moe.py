"""A mixture-of-experts model (tiny Qwen3-MoE, fused expert weights) on 2 FSDP2 ranks equals one process:
plain-SGD steps compared by weights, full SFT and LoRA on the experts (with the router load-balancing loss)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness import SGD, assert_sgd_runs_equal, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory, token_data, tokenizer) -> Path:
    """A tied-embedding Qwen3-MoE (4 experts, top-2, 512-token vocabulary); SGD runs on 2 FSDP2 ranks and on one."""
    import transformers

    tmp = tmp_path_factory.mktemp("moe")
    cfg = transformers.Qwen3MoeConfig(vocab_size=512, tie_word_embeddings=True, hidden_size=64, intermediate_size=128,
                                      moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, head_dim=16,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    base = {"model": str(tmp / "model"), "data": str(token_data), "micro": 2, "global": 4, **SGD,
            "log_dir": str(tmp / "runs")}
    for where, nproc in (("fsdp2", 2), ("single", 1)):
        launch(tmp, [{**base, "strategy": "fsdp2" if nproc > 1 else None, "peft": kind == "lora",
                      "name": f"{where}-{kind}", "out": str(tmp / where / kind)} for kind in ("sft", "lora")],
               nproc=nproc)
    return tmp


@pytest.mark.parametrize("kind", ["sft", "lora"])
def test_moe_on_two_fsdp2_ranks_equals_one_process(moe_runs, kind):
    if kind == "lora":  # the experts' fused weights carry adapters, and they moved
        final = torch.load(moe_runs / "single" / kind / "final.pt", weights_only=True)
        assert any(".experts." in k and "lora_B" in k and v.abs().sum() > 0 for k, v in final.items()), sorted(final)
    assert_sgd_runs_equal(moe_runs / "fsdp2" / kind, moe_runs / "single" / kind, f"fsdp2 moe {kind}")
