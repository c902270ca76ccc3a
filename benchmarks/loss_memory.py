"""Peak memory of one training forward + backward: chunked fused loss ÷ plain logits loss.

A random Llama (hidden 512, 2 layers, vocab 32768, untied lm_head, full SFT so the output weight
gets a gradient too) on a batch of 2 x 1024 tokens, run through ``HFAutoModelForCausalLM.loss``
with ``chunked_loss=False`` and ``True``. Each mode runs in a fresh process and reports the peak
RSS growth (``ru_maxrss`` after the step minus the RSS just before it): the model, the batch and
the allocator's start-up are excluded, everything the step allocates is counted. Also printed:
the step time of each mode (one step per fresh process, so noisy on a busy machine).

    .venv/bin/python benchmarks/loss_memory.py [--vocab 32768 --seq 1024 --batch 2 --bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from memory import fresh_process_result, peak_rss, reset_peak, rss


def worker(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from nemo_automodel.models import HFAutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
                                   max_position_embeddings=args.seq + 1)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)
        wrapper = HFAutoModelForCausalLM(tmp, chunked_loss=args.mode == "chunked")
        wrapper._tokenizer = object()  # the batch is pre-tokenized: no tokenizer is needed
        module = wrapper.configure_model("cpu").train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(args.batch, args.seq),
             "position_ids": torch.arange(args.seq).expand(args.batch, -1)}
    before = rss()
    reset_peak()  # else the peak of loading the model (save + reload) can mask the step's own peak
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        loss = wrapper.loss(module, batch)
    loss.backward()
    secs = time.perf_counter() - t
    peak = peak_rss()
    return {"peak_growth": peak - before, "loss": loss.item(), "seconds": secs,
            "grad_norm": float(module.lm_head.weight.grad.norm())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--mode", choices=("plain", "chunked"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    res = {}
    for mode in ("plain", "chunked"):
        cmd = [sys.executable, __file__, "--mode", mode, "--vocab", str(args.vocab), "--seq", str(args.seq),
               "--batch", str(args.batch)] + (["--bf16"] if args.bf16 else [])
        res[mode] = fresh_process_result(cmd)
    tokens = args.batch * args.seq
    logits_mib = tokens * args.vocab * 4 / 2**20
    print(f"loss memory: vocab {args.vocab}, {args.batch}x{args.seq} tokens ({logits_mib:.0f} MiB of fp32 logits), "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, full SFT, load average {os.getloadavg()[0]:.1f}")
    for mode, r in res.items():
        print(f"  {mode:<8} peak growth {r['peak_growth'] / 2**20:7.0f} MiB, fwd+bwd {r['seconds']:.2f} s, "
              f"loss {r['loss']:.5f}, |grad lm_head| {r['grad_norm']:.5f}")
    ratio = res["chunked"]["peak_growth"] / res["plain"]["peak_growth"]
    print(f"ratio peak memory chunked ÷ plain: {ratio:.2f} (goal <= 0.5); time chunked ÷ plain: "
          f"{res['chunked']['seconds'] / res['plain']['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
