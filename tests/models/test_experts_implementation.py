"""Which experts kernel a mixture-of-experts model gets from our loading path (issue 24, item 7).

`load_hf_model` passes no ``experts_implementation``, so transformers 5.24 picks ``grouped_mm`` for every family whose
experts carry ``@use_experts_implementation`` (Qwen3-MoE, Mixtral, ...). That is the fastest one here: fwd + bwd of
the Qwen3-MoE of ``benchmarks/peers.py`` (hidden 128, 4 layers, 8 experts top-2), CPU time on 1 thread, median of 10
per-rep ratios to ``grouped_mm``: eager 1.13 / 1.05 / 1.02 and batched_mm 19.8 / 11.1 / 18.4 in fp32 / bf16 /
fp32 under bf16 autocast. On CUDA, bf16 on SM90/SM100 runs torch's CUTLASS grouped GEMM; other dtypes run aten's
per-expert loop after one device-to-host sync (eager syncs once per expert; batched_mm gathers one weight matrix
per routed token). These tests fail if that default changes or the native kernel stops being used here.
"""

from __future__ import annotations

import pytest
import torch

from nemo_automodel import llm


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_model_runs_its_experts_with_torch_grouped_mm(tiny_model_factory, monkeypatch, dtype):
    model = llm.HFAutoModelForCausalLM(tiny_model_factory("qwen3_moe"), torch_dtype=dtype).configure_model()
    assert model.config._experts_implementation == "grouped_mm"
    calls = []
    native = torch.nn.functional.grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[1].dtype)
        return native(*args, **kwargs)

    # transformers falls back to its own Python loop (a custom op) where torch's kernel is unusable
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", counting)
    model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6]])).logits.sum().backward()
    layers = model.config.num_hidden_layers
    assert calls == [getattr(torch, dtype)] * 2 * layers  # gate_up and down projections of every layer


def test_dense_model_loads_without_an_experts_implementation(tiny_llama):
    # the same loading call for a model without experts: transformers settles on "eager" (nothing to dispatch)
    model = llm.HFAutoModelForCausalLM(tiny_llama).configure_model()
    assert model.config._experts_implementation == "eager"
