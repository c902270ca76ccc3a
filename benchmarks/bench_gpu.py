"""GPU throughput and MFU: ours (LoRA and full SFT, compile off/on) and TRL's SFTTrainer, like with like.

    .venv/bin/python benchmarks/bench_gpu.py            # one H100/H200-class GPU, <= 8 minutes -> RESULTS.md
    .venv/bin/python benchmarks/bench_gpu.py --smoke    # the same code on a tiny model on CPU (< 1 min; in the suite)

Models: random-init Llama-3.2-1B and Llama-3-8B shapes (configs below, no download), bf16 weights
(``precision="bf16-true"``: LoRA adapters and their AdamW state fp32), rows of 4096 random tokens
(one sequence per row: every peer does exactly the same attention work), micro-batch 1, AdamW lr 1e-5
(LoRA r16 on the 7 projections: 1e-4). Ours runs with liger-kernel and the fused/chunked loss (on CUDA),
torch.compile per decoder block off and on (``JitTransform``). TRL's ``SFTTrainer`` (from
``.venv-bench/site``, installed by ``make bench``) gets the same model, rows and precision: weights
loaded in bf16, no autocast, no packing, no gradient checkpointing, every setting printed.

FLOPs per token (stated, not measured): full SFT 6·N, LoRA 4·N (forward + input-gradient backward; the
adapters' own FLOPs are left out), N = matmul weights without the input embedding; plus attention
6·L·s·h per token (QKᵀ and AV, causal half, forward + backward, s = 4096, h = hidden size), counted for
both. MFU = model FLOP/s ÷ the device's dense bf16 peak (looked up by device name, printed).
Each run is a fresh process; warm-up steps are dropped; tokens/s is the median over timed steps,
printed with min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_SITE = ROOT / ".venv-bench" / "site"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         max_position_embeddings=8192),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                       max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False, max_position_embeddings=512),
}
# Dense bf16 peak FLOP/s (no sparsity) by a substring of torch.cuda.get_device_name(); first match wins.
PEAKS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
         ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12), ("L4", 121e12)]
FULL_RUNS = [(m, mode, compiled, fw) for m in ("llama-3.2-1b", "llama-3-8b") for mode in ("lora", "full")
             for fw, compiled in (("ours", False), ("ours", True), ("trl", False))]


def peak_flops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAKS if key.lower() in device_name.lower()), None)


def flops_per_token(cfg: dict, mode: str, seq: int) -> float:
    """6·N (full) or 4·N (LoRA) + 6·L·s·h attention, N = matmul weights without the input embedding."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    n = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * cfg["vocab_size"]
    return (6 if mode == "full" else 4) * n + 6 * layers * seq * h


# -- one run in its own process ---------------------------------------------------------------------
def _model_dir(tmp: str, model: str) -> Path:
    """A folder with the config (random init where the job runs) and a tokenizer (only its pad id is used)."""
    import transformers

    from nemo_automodel.demo.assets import save_smollm2_tokenizer

    out = Path(tmp) / model
    transformers.LlamaConfig(**MODELS[model], bos_token_id=1, eos_token_id=2).save_pretrained(out)
    save_smollm2_tokenizer(out)
    return out


def _rows(vocab: int, seq: int, n: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (n, seq), generator=gen).tolist()


def _settings(spec: dict, bf16: bool) -> dict:
    settings = dict(model=spec["model"], mode=spec["mode"], compile=spec["compile"], framework=spec["framework"],
                    precision="bf16 weights, fp32 LoRA" if bf16 else "fp32", seq=spec["seq"], rows_per_step=1,
                    packing=False, gradient_checkpointing=False, lora_rank=16 if spec["mode"] == "lora" else None)
    print("CONFIG " + json.dumps(settings), flush=True)
    return settings


def run_ours(spec: dict, tmp: str, cuda: bool) -> list[float]:
    import datasets
    import torch

    from nemo_automodel import lightning as nl
    from nemo_automodel import llm
    from nemo_automodel.trainer.jit import JitConfig, JitTransform

    times: list[float] = []

    class Clock:
        def on_train_start(self, trainer, module):
            self.t = time.perf_counter()

        def on_train_step_end(self, trainer, step, metrics):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

    _settings(spec, bf16=cuda)
    steps = spec["warmup"] + spec["steps"]
    rows = datasets.Dataset.from_dict({"input_ids": _rows(MODELS[spec["model"]]["vocab_size"], spec["seq"] + 1, steps)})
    callbacks = [JitTransform(JitConfig(use_torch=True))] if spec["compile"] else []
    llm.api.finetune(
        model=llm.HFAutoModelForCausalLM(str(_model_dir(tmp, spec["model"])), load_pretrained_weights=False,
                                         use_liger_kernel=cuda, chunked_loss=True),
        peft=llm.peft.LoRA(target_modules=LORA_TARGETS, dim=16, alpha=32) if spec["mode"] == "lora" else None,
        data=llm.HFDatasetDataModule(rows, seq_length=spec["seq"], micro_batch_size=1, global_batch_size=1,
                                     pad_token_id=0, shuffle=False),
        optim=_adam(spec),
        trainer=nl.Trainer(max_steps=steps, precision="bf16-true" if cuda else "32", callbacks=[*callbacks, Clock()],
                           enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=10**6),
        log=nl.NeMoLogger(log_dir=tmp, name="ours", tensorboard=False),
    )
    return times


def _adam(spec: dict):
    import fiddle as fdl

    from nemo_automodel import llm

    return fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=1e-4 if spec["mode"] == "lora" else 1e-5))


def run_trl(spec: dict, tmp: str, cuda: bool) -> list[float]:
    import datasets
    import peft
    import torch
    import transformers
    from trl import SFTConfig, SFTTrainer

    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    _settings(spec, bf16=cuda)
    folder = _model_dir(tmp, spec["model"])
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    steps = spec["warmup"] + spec["steps"]
    # seq tokens: the model sees seq positions, as ours does (its rows are seq + 1 tokens, shifted once)
    rows = datasets.Dataset.from_dict({"input_ids": _rows(config.vocab_size, spec["seq"], steps)})
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM") \
        if spec["mode"] == "lora" else None
    cfg = SFTConfig(output_dir=tmp, max_steps=steps, per_device_train_batch_size=1, learning_rate=_adam_lr(spec),
                    lr_scheduler_type="constant", weight_decay=0.0, logging_steps=10**6, save_strategy="no",
                    report_to=[], use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                    bf16=False, fp16=False, gradient_checkpointing=False, packing=False, padding_free=False,
                    max_length=spec["seq"], loss_type="nll", completion_only_loss=False, use_liger_kernel=cuda)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    SFTTrainer(model=model, args=cfg, train_dataset=rows, processing_class=tok, peft_config=lora,
               callbacks=[Clock()]).train()
    return times


def _adam_lr(spec: dict) -> float:
    return 1e-4 if spec["mode"] == "lora" else 1e-5


def worker(spec: dict) -> dict:
    """Run one spec here; returns the timed steps' seconds, the device and its peak memory."""
    import torch

    cuda = torch.cuda.is_available() and not spec["smoke"]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        times = (run_trl if spec["framework"] == "trl" else run_ours)(spec, tmp, cuda)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"times": times[spec["warmup"]:], "device": device, "peak_gib": mem}


def _in_process(spec: dict) -> dict:
    """``--smoke``: every spec in this process (the same code, without a process start per run)."""
    if spec["framework"] == "trl" and str(BENCH_SITE) not in sys.path:
        sys.path.append(str(BENCH_SITE))
    try:
        return worker(spec)
    except Exception as err:  # a broken peer is a row that says so, not a crashed benchmark
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}


# -- driver -------------------------------------------------------------------------------------------
def _launch(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if spec["framework"] == "trl":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_SITE), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    result = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    config = next((line[7:] for line in proc.stdout.splitlines() if line.startswith("CONFIG ")), None)
    if result is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}", "config": config}
    return {**result, "config": config}


def row(spec: dict, res: dict) -> dict:
    """A result line: tokens/s (median, min, max), model TFLOP/s per GPU and MFU."""
    base = {"model": spec["model"], "mode": spec["mode"], "framework": spec["framework"],
            "compile": "on" if spec["compile"] else "off"}
    if "error" in res or not res.get("times"):
        return {**base, "error": res.get("error", "no timed steps")}
    rates = [spec["seq"] / t for t in res["times"]]
    tok_s = statistics.median(rates)
    tflops = tok_s * flops_per_token(MODELS[spec["model"]], spec["mode"], spec["seq"]) / 1e12
    peak = peak_flops(res["device"])
    return {**base, "device": res["device"], "tok_s": tok_s, "tok_s_min": min(rates), "tok_s_max": max(rates),
            "tflops": tflops, "mfu": tflops * 1e12 / peak if peak else None, "peak_gib": res["peak_gib"]}


def table(rows: list[dict]) -> str:
    lines = ["| model | mode | framework | compile | tokens/s (min–max) | TFLOP/s/GPU | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['framework']} | {r['compile']} | failed: {r['error']} | | | |")
            continue
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        lines.append(f"| {r['model']} | {r['mode']} | {r['framework']} | {r['compile']} | {r['tok_s']:,.0f} "
                     f"({r['tok_s_min']:,.0f}–{r['tok_s_max']:,.0f}) | {r['tflops']:.1f} | {mfu} | {mem} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, fp32, 1+2 steps, one process (the suite "
                   "runs this)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=480, help="stop starting runs after this many seconds")
    p.add_argument("--out", default=str(RESULTS), help="markdown file the table is appended to ('' to skip)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    runs = [("tiny", mode, compiled, fw) for mode, compiled, fw in
            (("lora", False, "ours"), ("lora", True, "ours"), ("lora", False, "trl"), ("full", False, "ours"),
             ("full", False, "trl"))] if args.smoke else FULL_RUNS
    steps, warmup = args.steps or (2 if args.smoke else 8), args.warmup or (1 if args.smoke else 3)
    seq = 64 if args.smoke else 4096
    print("FLOPs/token: full 6·N, LoRA 4·N, + attention 6·L·s·h (N: matmul weights without the input embedding)")
    start, rows = time.perf_counter(), []
    for model, mode, compiled, fw in runs:
        spec = dict(model=model, mode=mode, compile=compiled, framework=fw, steps=steps, warmup=warmup, seq=seq,
                    smoke=args.smoke)
        left = args.budget_s - (time.perf_counter() - start)
        if fw == "trl" and not (BENCH_SITE / "trl").is_dir():
            res = {"error": f"TRL not installed in {BENCH_SITE} (make bench installs it)"}
        elif left < 20:
            res = {"error": "skipped: time budget spent"}
        else:
            res = _in_process(spec) if args.smoke else _launch(spec, timeout=left)
        rows.append(row(spec, res))
        print(f"{model} {mode} {fw} compile={'on' if compiled else 'off'} -> {rows[-1]}", flush=True)
    device = next((r["device"] for r in rows if "device" in r), "unknown")
    peak = peak_flops(device)
    header = (f"\n## bench-gpu{' --smoke' if args.smoke else ''}: {device} (dense bf16 peak "
              f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}), {time.strftime('%Y-%m-%d')}\n\n"
              f"seq {seq}, micro-batch 1, {warmup} warm-up + {steps} timed steps per run; "
              "FLOPs/token: full 6·N, LoRA 4·N, + attention 6·L·s·h.\n\n")
    text = header + table(rows) + "\n"
    print(text)
    if args.out and not args.smoke:
        with open(args.out, "a") as f:
            f.write(text)
    return 0 if all("error" not in r or r["framework"] == "trl" and "not installed" in r["error"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
