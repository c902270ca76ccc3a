"""Fused kernels on CUDA: liger-kernel and cut-cross-entropy give the plain loss and gradients.

Self-contained (imports only nemo_automodel.models and tests.helpers) so the device check can run this
file alone; ``make gpu-extras`` installs the two packages there.
"""

from __future__ import annotations

import pytest
import torch

from nemo_automodel.models import HFAutoModelForCausalLM
from tests.helpers import require_module

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    import transformers

    out = tmp_path_factory.mktemp("gpu-llama")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def _loss_and_grads(model, module, batch):
    module.zero_grad(set_to_none=True)
    loss = model.loss(module, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


@pytest.mark.parametrize(("option", "dtype", "impl"), [
    ({"use_liger_kernel": True}, "float32", "liger"),
    ({"chunked_loss": "cce"}, "bfloat16", "cce"),
    ({"chunked_loss": "cce"}, "float32", "cce"),  # CCE's backward needs bf16: runs the chunked torch loss
])
def test_fused_loss_equals_plain_on_cuda(option, dtype, impl, llama_dir):
    require_module("liger_kernel" if impl == "liger" else "cut_cross_entropy", "make gpu-extras installs it")
    ids = torch.randint(0, 1000, (2, 32), device="cuda")
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "loss_mask": torch.ones(2, 32, device="cuda")}
    plain = HFAutoModelForCausalLM(str(llama_dir), torch_dtype=dtype)
    ref_loss, ref_grads = _loss_and_grads(plain, plain.configure_model("cuda"), batch)  # before liger patches
    fused = HFAutoModelForCausalLM(str(llama_dir), torch_dtype=dtype, **option)
    fused_module = fused.configure_model("cuda")
    assert fused._loss_impl == impl
    loss, grads = _loss_and_grads(fused, fused_module, batch)
    exact = dtype == "float32"
    assert (loss - ref_loss).abs().item() / ref_loss.item() < (1e-3 if exact else 2e-2)
    for name, grad in ref_grads.items():
        if exact:
            assert torch.allclose(grads[name], grad, rtol=1e-2, atol=1e-4), name
        else:
            assert _cosine(grads[name], grad) > 0.99, name
