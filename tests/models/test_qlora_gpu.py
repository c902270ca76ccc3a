"""QLoRA on CUDA: bitsandbytes' CUDA kernels under our model, a few steps of training.

Self-contained (no tokenizer or data fixtures) so the device check can run this file alone.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import require_module

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    import transformers

    out = tmp_path_factory.mktemp("gpu-qlora-llama")
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_trains_on_cuda(llama_dir, quant_type):
    bnb = require_module("bitsandbytes", "bitsandbytes: make venv, or make gpu-extras on a GPU")

    from nemo_automodel.models import HFAutoModelForCausalLM
    from nemo_automodel.peft import LoRA

    model = HFAutoModelForCausalLM(str(llama_dir), quantization=quant_type)
    model.configure_model("cuda")
    module = model.apply_peft(LoRA(target_modules=["*_proj"], dim=8)).train()
    layers = [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and all(m.weight.device.type == "cuda" and m.weight.dtype == torch.uint8 for m in layers)
    assert all(m.weight.quant_state.quant_type == quant_type for m in layers)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.device.type == "cuda" for p in trainable)
    # a learnable batch (arithmetic sequences of ids); the same test run on CPU: 6.95 -> 5.28 in 30 steps (nf4)
    ids = ((torch.arange(8 * 64).reshape(8, 64) * 3 + torch.arange(8)[:, None] * 11) % 997 + 3).cuda()
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones_like(ids[:, 1:])}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(module, batch) / batch["loss_mask"].sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    assert torch.cuda.max_memory_allocated() > 0
