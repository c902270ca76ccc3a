"""Peak memory of building a Megatron model from a HF checkpoint: streamed safetensors ÷ transformers.

A random Llama (hidden 1024, 8 layers, vocab 32768, untied; about 160 M parameters, 0.6 GiB in
fp32) is saved once as safetensors. Each loader then runs in a fresh process that builds
`MegatronGPTModel(folder).configure_model()` (TP=1, CPU): ``stream`` reads the checkpoint tensor
by tensor (the default), ``transformers`` loads the whole HF model first (the path kept for
checkpoints without safetensors). Printed: the peak RSS growth of each, in MiB and as a multiple
of the model's own parameter bytes, and their ratio.

    .venv/bin/python benchmarks/megatron_load.py [--layers 8 --hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from memory import AnonPeak, anon_rss, fresh_process_result, peak_rss, reset_peak, rss


def worker(folder: str, mode: str) -> dict:
    # transformers is imported here, before timing, in both modes (configure_model reads the config with it)
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_automodel.megatron import MegatronGPTModel, MegatronStrategy

    strategy = MegatronStrategy()
    strategy.setup("cpu")
    model = MegatronGPTModel(folder)
    if mode == "transformers":  # the loader used when a checkpoint has no safetensors
        model._hf_tensors = lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    before, anon_before = rss(), anon_rss()
    reset_peak()
    t = time.perf_counter()
    with AnonPeak() as anon:
        module = model.configure_model()
    secs = time.perf_counter() - t
    growth, anon_growth = peak_rss() - before, anon.peak - anon_before
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    checksum = float(sum(p.double().sum() for p in module.parameters()))
    strategy.teardown()
    return {"growth": growth, "anon_growth": anon_growth, "param_bytes": param_bytes, "seconds": secs, "checksum": checksum}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--checkpoint-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype the checkpoint is saved in (most Hub checkpoints are bf16; the model is fp32)")
    p.add_argument("--worker", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker)), flush=True)
        return 0
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32768, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                   num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                   num_key_value_heads=args.hidden // 256, tie_word_embeddings=False)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).to(getattr(torch, args.checkpoint_dtype)).save_pretrained(tmp)
        for mode in ("transformers", "stream"):
            res[mode] = fresh_process_result([sys.executable, __file__, "--worker", tmp, mode])
    size = res["stream"]["param_bytes"]
    print(f"Megatron load: Llama hidden {args.hidden}, {args.layers} layers, vocab 32768, "
          f"{size / 2**20:.0f} MiB of fp32 parameters from a {args.checkpoint_dtype} checkpoint, TP=1, load average {os.getloadavg()[0]:.1f}")
    for mode, r in res.items():
        print(f"  {mode:<12} peak growth: anonymous {r['anon_growth'] / 2**20:6.0f} MiB "
              f"({r['anon_growth'] / size:.2f}x the model), all resident {r['growth'] / 2**20:6.0f} MiB; "
              f"{r['seconds']:.1f} s, parameter checksum {r['checksum']:.6f}")
    ratio = res["stream"]["anon_growth"] / res["transformers"]["anon_growth"]
    print(f"ratio peak anonymous load memory streamed ÷ transformers: {ratio:.2f}; time streamed ÷ transformers: "
          f"{res['stream']['seconds'] / res['transformers']['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
