"""The memory planner's answers for Llama-3-8B, Qwen2.5-7B, Llama-3-70B and the mixture-of-experts
Qwen3-30B-A3B on 1 and 8 GPUs of 80 GiB.

The configs are written out from the models' published ``config.json`` values (nothing is
downloaded); their parameter counts are checked against the published ones (Qwen3-30B-A3B: its model
card's "30.5B", to the digit given). Every job: sequence
4096, micro batch 1, bf16 (LoRA / QLoRA: ``bf16-true``, a bf16 base with fp32 adapters; full
fine-tuning: ``bf16-mixed``, fp32 master weights), activation checkpointing and the chunked loss
off as given; on 8 GPUs FSDP2 (QLoRA: DDP, a 4-bit base is not FSDP2-shardable). Each row gives
the plan as given and, when it does not fit, the planner's cheapest changes and the memory they
lead to.

    .venv/bin/python benchmarks/plan_table.py            # prints the Markdown table for the README
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GPU_MEMORY = "80GiB"
SEQ = 4096


def configs() -> dict[str, tuple[object, int | str]]:
    """name -> (transformers config, published parameter count: exact, or as a model card rounds it, "30.5B")."""
    import transformers

    llama3 = dict(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, hidden_act="silu",
                  architectures=["LlamaForCausalLM"])
    return {
        "Llama-3-8B": (transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                num_attention_heads=32, num_key_value_heads=8, **llama3), 8_030_261_248),
        "Qwen2.5-7B": (transformers.Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                                max_position_embeddings=131072, rope_theta=1000000.0,
                                                rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                                                max_window_layers=28, sliding_window=131072, bos_token_id=151643,
                                                eos_token_id=151643, architectures=["Qwen2ForCausalLM"]),
                       7_615_616_512),
        "Llama-3-70B": (transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                                 num_attention_heads=64, num_key_value_heads=8, **llama3),
                        70_553_706_496),
        # 48 layers of 128 routed experts (8 per token, moe_intermediate_size 768), no shared expert
        "Qwen3-30B-A3B": (transformers.Qwen3MoeConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
            num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001,
            max_position_embeddings=40960, max_window_layers=48, rope_theta=1000000.0, rms_norm_eps=1e-6,
            attention_bias=False, tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
            bos_token_id=151643, eos_token_id=151645, architectures=["Qwen3MoeForCausalLM"]), "30.5B"),
    }


def matches_published(params: int, published: int | str) -> bool:
    """Whether a parameter count is the published one: exactly, or to the digits of a rounded "30.5B"."""
    if isinstance(published, int):
        return params == published
    digits = published.removesuffix("B")
    decimals = len(digits.partition(".")[2])
    return f"{params / 1e9:.{decimals}f}" == digits


METHODS = {"LoRA": dict(peft="lora", precision="bf16-true"),
           "QLoRA": dict(peft="lora", precision="bf16-true", quantization="nf4"),
           "full": dict(peft=None, precision="bf16-mixed")}


def table() -> str:
    from nemo_automodel.plan import gib, plan_memory

    rows = ["| model | method | GPUs | as given: GiB per GPU | verdict | cheapest changes that fit → GiB per GPU |",
            "|---|---|---|---|---|---|"]
    label = {None: "1", "ddp": "8 DDP", "fsdp2": "8 FSDP2"}
    for name, (config, published) in configs().items():
        for method, kwargs in METHODS.items():
            for gpus in (1, 8):
                strategy = None if gpus == 1 else "ddp" if "quantization" in kwargs else "fsdp2"
                result = plan_memory(config, gpu_memory=GPU_MEMORY, seq_length=SEQ, micro_batch_size=1, devices=gpus,
                                     strategy=strategy, **kwargs)
                est = result.estimate
                if not matches_published(est.params, published):
                    raise SystemExit(f"{name}: {est.params:,} parameters, published {published}")
                if result.fits:
                    verdict, advice = "fits", "—"
                elif result.advice and result.advice.result is not None:
                    verdict = "does not fit"
                    advice = (" ".join(f"`{c.override}`" for c in result.advice.changes)
                              + f" → {gib(result.advice.result.total):.1f}")
                else:
                    verdict, advice = "does not fit", f"nothing: {result.advice.reason}" if result.advice else "—"
                rows.append(f"| {name} | {method} | {label[strategy]} | {gib(est.total):.1f} | {verdict} | {advice} |")
    return "\n".join(rows)


def main() -> None:
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    print(table())
    print(f"\n({GPU_MEMORY} per GPU, seq {SEQ}, micro batch 1; planned in {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
