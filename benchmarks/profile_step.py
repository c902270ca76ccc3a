"""Where a training step's time goes: the model's own math (matmul, attention) vs everything else.

One full-SFT step of the MFU benchmark's Llama (hidden 512, 4 layers, vocab 8192, 4x256 tokens)
and one LoRA step of SmolLM2-135M on 2x512 tokens (the peers benchmark's shape), each under
torch.profiler after a warm-up. The "model math" share bounds what any training framework can
gain on the same model in the same precision: with share s, removing every other cost is at most
1/s faster. It is the reason behind the MFU and ours ÷ TRL readings (benchmarks/README.md).

    .venv/bin/python benchmarks/profile_step.py
"""

from __future__ import annotations

import time
import warnings

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from nemo_automodel.models.loss import masked_cross_entropy

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm"}
ATTENTION = {"aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def _llama512():
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=8, vocab_size=8192, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa"), (4, 256)


def _smollm2_lora():
    from peft import LoraConfig, get_peft_model

    from nemo_automodel.demo import assets

    model = transformers.AutoModelForCausalLM.from_pretrained(assets.smollm2_hf_dir(), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets)), (2, 512)


def profile_step(name: str, build) -> None:
    model, (batch, seq) = build()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        logits = model(input_ids=ids, use_cache=False).logits
        (masked_cross_entropy(logits, ids.roll(-1, 1), torch.ones(batch, seq)) / ids.numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL) / total
    attention = sum(e.self_cpu_time_total for e in events if e.key in ATTENTION) / total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:5]
    print(f"{name}: step {seconds:.2f} s; matmul {matmul:.2f}, attention {attention:.2f}, "
          f"everything else {1 - matmul - attention:.2f} of the time")
    print("  top ops: " + ", ".join(f"{e.key} {e.self_cpu_time_total / total:.2f}" for e in top))
    print(f"ratio model-math share of a step ({name}): {matmul + attention:.2f} "
          f"(any framework is at most {1 / (matmul + attention):.2f}x faster on this model and precision)")


def main() -> None:
    warnings.filterwarnings("ignore")
    profile_step("Llama hidden 512 full SFT", _llama512)
    profile_step("SmolLM2-135M LoRA", _smollm2_lora)


if __name__ == "__main__":
    main()
