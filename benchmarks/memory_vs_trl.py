"""Peak memory of a LoRA step, ours ÷ TRL SFTTrainer, and the longest packed row each fits in a budget.

SmolLM2-135M-Instruct (real weights, ``assets.smollm2_hf_dir()``), LoRA r16 on the 7 projections, AdamW
lr 1e-4, the demo chat data packed into rows of ``--seq`` tokens, one row per step. Both sides set
every memory-relevant setting explicitly and print it (``CONFIG`` lines):
- ours: activation checkpointing (per decoder layer, non-reentrant), the chunked loss, and
  precision ``32`` or ``bf16-true`` (bf16 base, fp32 adapters);
- TRL 1.16: gradient checkpointing on (its default), ``bf16`` False/True (autocast over fp32
  weights, its only bf16 mode for a LoRA model loaded in fp32), packing ``bfd``, ``padding_free`` off.

Memory is the **growth** of the process's anonymous resident memory (heap and tensors, not mapped
files) from just before the model is loaded to its peak over 2 steps, sampled every 2 ms: weights,
adapters, optimizer state, activations and the loss. Each run is a fresh process. ``--fit`` searches
the longest row (doubling from 512) that each side trains within ``--budget-gib`` of growth; a run
that crosses the budget is stopped at once ("does not fit").

    .venv/bin/python benchmarks/memory_vs_trl.py [--seq 4096] [--precisions 32,bf16] [--fit --budget-gib 1]

TRL lives in ``.venv-bench/site`` (``make bench`` installs it), never in ``.venv``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import anon_rss  # noqa: E402
from peers import BENCH_SITE, LORA_TARGETS, LR, ROOT, _config, _quiet  # noqa: E402

GIB = 2**30


class Budget:
    """Samples anonymous RSS every 2 ms; past ``limit`` bytes of growth the process reports and exits."""

    def __init__(self, limit: float | None) -> None:
        self.base = anon_rss()
        self.peak, self.limit = self.base, limit
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, anon_rss())
            if self.limit and self.peak - self.base > self.limit:
                print("RESULT " + json.dumps({"fits": False, "growth": self.peak - self.base}), flush=True)
                os._exit(0)
            time.sleep(0.002)

    @property
    def growth(self) -> int:
        return max(self.peak, anon_rss()) - self.base


def _messages(rows: int) -> list:
    from nemo_automodel.demo.assets import demo_chat_dataset

    return demo_chat_dataset(limit=rows, seed=0)["messages"]


def _rows_for(seq: int, steps: int) -> int:
    return min(2189, max(64, seq * steps // 60))  # the demo rows average ≈ 150 tokens; packing needs spares


def run_ours(seq: int, steps: int, precision: str, budget: Budget) -> dict:
    import datasets
    import fiddle as fdl

    from nemo_automodel import lightning as nl
    from nemo_automodel import llm
    from nemo_automodel.demo import assets

    trainer_precision = "bf16-true" if precision == "bf16" else "32"
    _config(precision=trainer_precision, packing=f"1 row x {seq}", activation_checkpointing=True, chunked_loss=True)
    times: list[float] = []

    class Timed(nl.Trainer):
        def _train_step(self, *a):
            t = time.perf_counter()
            out = super()._train_step(*a)
            times.append(time.perf_counter() - t)
            return out

    import tempfile

    with tempfile.TemporaryDirectory(prefix="memory-vs-trl-") as tmp:
        llm.api.finetune(
            model=llm.HFAutoModelForCausalLM(str(assets.smollm2_hf_dir()), activation_checkpointing=True,
                                             chunked_loss=True),
            data=llm.HFDatasetDataModule(datasets.Dataset.from_dict({"messages": _messages(_rows_for(seq, steps))}),
                                         formatting="chat", seq_length=seq, micro_batch_size=1,
                                         global_batch_size=1, packed_sequence_size=seq, seed=0),
            peft=llm.peft.LoRA(target_modules=LORA_TARGETS, dim=16, alpha=32),
            optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=LR)),
            trainer=Timed(max_steps=steps, log_every_n_steps=10**9, enable_progress_bar=False,
                          enable_checkpointing=False, precision=trainer_precision),
            log=nl.NeMoLogger(log_dir=tmp, name="ours", tensorboard=False))
    return {"fits": True, "growth": budget.growth, "step_seconds": times}


def run_trl(seq: int, steps: int, precision: str, budget: Budget) -> dict:
    import tempfile

    import datasets
    import transformers
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from nemo_automodel.demo import assets

    model = transformers.AutoModelForCausalLM.from_pretrained(assets.smollm2_hf_dir(), attn_implementation="sdpa",
                                                              dtype="float32")
    tok = transformers.AutoTokenizer.from_pretrained(assets.smollm2_hf_dir())
    ds = datasets.Dataset.from_list([{"prompt": m[:1], "completion": m[1:]} for m in _messages(_rows_for(seq, steps))])
    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    settings = dict(packing=True, packing_strategy="bfd", padding_free=False, max_length=seq, loss_type="nll",
                    completion_only_loss=True, gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": False})
    _config(precision="bf16-mixed" if precision == "bf16" else "32", rows_per_step=1, **settings)
    with tempfile.TemporaryDirectory(prefix="memory-vs-trl-") as tmp:
        cfg = SFTConfig(output_dir=tmp, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                        weight_decay=0.0, logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
                        dataloader_num_workers=0, disable_tqdm=True, seed=0, bf16=precision == "bf16", fp16=False,
                        per_device_train_batch_size=1, **settings)
        SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()],
                   peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                          task_type="CAUSAL_LM")).train()
    return {"fits": True, "growth": budget.growth, "step_seconds": times}


def worker(args) -> None:
    _quiet()
    import torch
    import transformers  # noqa: F401

    import nemo_automodel.api  # noqa: F401 - imports done before the baseline, on both sides alike

    torch.manual_seed(0)
    budget = Budget(args.budget_gib * GIB if args.budget_gib else None)
    run = run_trl if args.worker == "trl" else run_ours
    print("RESULT " + json.dumps(run(args.seq, args.steps, args.precision, budget)), flush=True)


# -- driver ------------------------------------------------------------------------------
def measure(who: str, seq: int, precision: str, steps: int, budget_gib: float | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MALLOC_MMAP_THRESHOLD_="65536")
    if who == "trl":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_SITE), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--worker", who, "--seq", str(seq), "--precision", precision,
           "--steps", str(steps)] + (["--budget-gib", str(budget_gib)] if budget_gib else [])
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    config = next((ln[7:] for ln in out.stdout.splitlines() if ln.startswith("CONFIG ")), "")
    results = [json.loads(ln[7:]) for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not results:
        raise RuntimeError(f"{who} seq {seq}: exit {out.returncode}: {out.stderr.strip().splitlines()[-3:]}")
    return {**results[-1], "config": config}


def _show(who: str, seq: int, r: dict) -> None:
    steps = ", ".join(f"{s:.1f}" for s in r.get("step_seconds", []))
    state = f"{r['growth'] / GIB:.2f} GiB" if r["fits"] else f"> budget (stopped at {r['growth'] / GIB:.2f} GiB)"
    print(f"  {who:<5} seq {seq:>6}: growth {state}; step s [{steps}]  {r['config']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096, help="packed row length of the memory pair (default 4096)")
    p.add_argument("--precisions", default="32", help="comma list of 32,bf16 (default 32; bf16 needs a CPU with "
                                                      "bf16 instructions to finish in reasonable time)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--fit", action="store_true", help="also search the longest row within --budget-gib")
    p.add_argument("--budget-gib", type=float, default=None, help="growth budget of --fit (default 1 GiB)")
    p.add_argument("--max-seq", type=int, default=32768)
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--precision", default="32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)  # no budget unless the driver passed one
        return 0
    args.budget_gib = args.budget_gib or 1.0
    if not (BENCH_SITE / "trl").is_dir():
        print(f"TRL is not installed in {BENCH_SITE}: run `make bench` once (it installs trl==1.16.0 there)")
        return 2
    for precision in args.precisions.split(","):
        print(f"precision {precision}: SmolLM2-135M LoRA r16, packed rows of {args.seq}, {args.steps} steps, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        got = {who: measure(who, args.seq, precision, args.steps, None) for who in ("ours", "trl")}
        for who, r in got.items():
            _show(who, args.seq, r)
        print(f"ratio peak memory growth ours ÷ TRL ({precision}, seq {args.seq}): "
              f"{got['ours']['growth'] / got['trl']['growth']:.2f} (goal <= 0.4)", flush=True)
        if not args.fit:
            continue
        longest = {}
        for who in ("ours", "trl"):
            seq, longest[who] = 512, 0
            while seq <= args.max_seq:
                r = measure(who, seq, precision, 1, args.budget_gib)
                _show(who, seq, r)
                if not r["fits"]:
                    break
                longest[who], seq = seq, seq * 2
        print(f"ratio longest packed row within {args.budget_gib:g} GiB ours ÷ TRL ({precision}): "
              f"{longest['ours'] / max(longest['trl'], 1):.1f} ({longest['ours']} vs {longest['trl']} tokens; "
              f"goal >= 4; powers of 2, capped at {args.max_seq})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
