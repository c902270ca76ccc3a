"""Megatron-Core on CUDA: nothing patched, same logits as HF; Transformer Engine's spec where installed.

Self-contained (no tokenizer fixture) so the device check can run this file alone.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import require_module

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.parametrize("megatron_strategy", ["gpu"], indirect=True)]


def _qwen2(tmp_path):
    import transformers

    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).cuda().eval()


def test_cuda_runs_unpatched_and_matches_hf(megatron_strategy, tmp_path):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from nemo_automodel.megatron import MegatronGPTModel, cpu_shim
    from nemo_automodel.peft import LoRA

    hf = _qwen2(tmp_path)
    model = MegatronGPTModel(str(tmp_path))
    module = model.configure_model(megatron_strategy.device).eval()
    assert cpu_shim.apply() is False and not cpu_shim._APPLIED
    assert not hasattr(RotaryEmbedding.get_emb, "__wrapped__")
    ids = (torch.arange(2 * 16).reshape(2, 16) * 37 % 509 + 3).cuda()
    with torch.no_grad():
        diff = (model.logits(module, {"input_ids": ids}) - hf(input_ids=ids, use_cache=False).logits).abs().max()
    assert diff.item() < 1e-4
    module = LoRA(target_modules=["*_proj"], dim=4).apply(module).train()
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "loss_mask": torch.ones_like(ids, dtype=torch.float32)}
    model.loss(module, batch).backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_transformer_engine_layer_spec_builds(megatron_strategy):
    require_module("transformer_engine", "Transformer Engine (not in make gpu-extras)")
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    from nemo_automodel.megatron import GPTConfig

    cfg = GPTConfig(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                    vocab_size=512)
    model = GPTModel(config=cfg.transformer_config(), transformer_layer_spec=get_gpt_layer_with_transformer_engine_spec(),
                     **cfg.gpt_model_kwargs()).cuda()
    ids = torch.randint(0, 512, (1, 8), device="cuda")
    out = model(ids, torch.arange(8, device="cuda")[None], None)
    assert out.shape == (1, 8, 512)
