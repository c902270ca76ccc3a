"""DDP and FSDP2 on 2 processes against one process: tokens/s and peak memory per rank, in one run.

All three modes train the same random Llama (saved to a temp folder, loaded by path) on the same
pre-tokenized rows with the same global batch per optimizer step (one process accumulates the
micro-batches that the 2 ranks run side by side), full SFT (or LoRA) with AdamW, checkpointing
off. Each mode is a fresh ``python`` process calling ``Trainer(devices=N)`` (the trainer starts
its workers itself); the processes share this machine's cores (1 torch thread per rank with 2
ranks, all cores for one process). Reported per mode:

- tokens/s: all ranks' tokens over the median step time after ``--warmup`` steps;
- peak RSS: the largest resident set of any rank (``ru_maxrss``; includes the Python/torch
  baseline and the model load, which every rank does in full before FSDP2 shards it);
- train RSS: the largest resident set sampled every 5 ms while training steps run;
- state: this rank's parameters + gradients + optimizer states (local shards) in MiB.

With ``--repeat N`` the modes run N rounds in alternating order and each number is the median.

    .venv/bin/python benchmarks/distributed.py [--steps 8] [--warmup 2] [--lora] [--hidden 512 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODES = {"single": (1, None), "ddp": (2, "ddp"), "fsdp2": (2, "fsdp2")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default 8192)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--micro", type=int, default=4, help="rows per micro-batch and rank (default 4)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per mode (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing (default 2)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds over the modes (alternating order; per-mode median reported) against load drift")
    p.add_argument("--lora", action="store_true", help="LoRA r8 on the projections instead of full SFT")
    p.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)  # one mode, in a child process
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


class MemoryProbe:
    """Trainer callback (picklable, so it reaches spawned workers): memory of this rank to a JSON file."""

    def __init__(self, out: str) -> None:
        self.out, self.peak_train = out, 0

    def on_train_start(self, trainer, module) -> None:
        self.module, self.stop = module, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.stop.is_set():
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * page
            self.peak_train = max(self.peak_train, rss)
            time.sleep(0.005)

    def on_train_step_end(self, trainer, step, metrics) -> None:
        if step == trainer.max_steps:  # gradients are freed by now: count them as the parameters' size
            self.stop.set()
            self.thread.join()
            self._write(trainer)

    def _write(self, trainer) -> None:
        def local_bytes(t):
            t = t.to_local() if hasattr(t, "to_local") else t
            return t.numel() * t.element_size()

        params = [p for p in self.module.parameters() if p.requires_grad]
        state = sum(local_bytes(p) for p in params) * 4  # param + grad + AdamW's 2 moments
        rank = trainer.strategy.rank
        Path(self.out, f"mem-rank{rank}.json").write_text(json.dumps({
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "train_rss": self.peak_train, "state": state}))


def build_inputs(args, workdir: Path) -> tuple[Path, Path]:
    """A random Llama and pre-tokenized rows, written once for all modes."""
    import datasets
    import torch
    import transformers

    from nemo_automodel.demo.assets import save_smollm2_tokenizer

    model_dir, data_dir = workdir / "model", workdir / "data"
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                                   max_position_embeddings=args.seq + 1, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    save_smollm2_tokenizer(model_dir)
    rows = 2 * args.micro * (args.steps + 1)
    ids = torch.randint(3, args.vocab, (rows, args.seq + 1)).tolist()
    datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(data_dir))
    return model_dir, data_dir


def run_mode(args) -> None:
    """Child process: train one mode; rank 0's metrics.jsonl and each rank's memory file land in workdir."""
    import functools

    import torch

    from nemo_automodel.api import finetune
    from nemo_automodel.data import HFDatasetDataModule
    from nemo_automodel.models import HFAutoModelForCausalLM
    from nemo_automodel.peft import LoRA
    from nemo_automodel.trainer import NeMoLogger, Trainer
    from nemo_automodel.trainer.optim import PytorchOptimizerModule

    workdir = Path(args.workdir)
    devices, strategy = MODES[args.mode]
    data = HFDatasetDataModule(str(workdir / "data"), formatting=None, seq_length=args.seq + 1,
                               micro_batch_size=args.micro, global_batch_size=2 * args.micro, pad_token_id=0,
                               shuffle=False)
    out = workdir / args.mode
    out.mkdir()
    trainer = Trainer(devices=devices, strategy=strategy, max_steps=args.steps, log_every_n_steps=1,
                      enable_progress_bar=False, enable_checkpointing=False, callbacks=[MemoryProbe(str(out))])
    finetune(model=HFAutoModelForCausalLM(str(workdir / "model")), data=data, trainer=trainer,
             peft=LoRA(target_modules=["*_proj"], dim=8) if args.lora else None,
             optim=PytorchOptimizerModule(functools.partial(torch.optim.AdamW, lr=1e-4)),
             log=NeMoLogger(log_dir=str(workdir / "runs"), name=args.mode, tensorboard=False))


def summarize(workdir: Path, mode: str, warmup: int) -> dict:
    rows = [json.loads(line) for line in (workdir / "runs" / mode / "metrics.jsonl").read_text().splitlines()]
    mems = [json.loads(p.read_text()) for p in sorted((workdir / mode).glob("mem-rank*.json"))]
    return {"tok_s": statistics.median(r["tokens_per_sec"] for r in rows[warmup:]),
            **{k: max(m[k] for m in mems) / 2**20 for k in ("peak_rss", "train_rss", "state")}}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mode:
        return run_mode(args)
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        workdir = Path(tmp)
        build_inputs(args, workdir)
        passthrough = list(argv if argv is not None else sys.argv[1:])
        rounds: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for i in range(args.repeat):
            for mode in list(MODES)[:: 1 if i % 2 == 0 else -1]:
                shutil.rmtree(workdir / mode, ignore_errors=True)
                shutil.rmtree(workdir / "runs" / mode, ignore_errors=True)
                subprocess.run([sys.executable, __file__, *passthrough, "--mode", mode, "--workdir", str(workdir)],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                rounds[mode].append(summarize(workdir, mode, args.warmup))
        results = {mode: {**{k: statistics.median(r[k] for r in rs) for k in rs[0]},
                          "rounds": [r["tok_s"] for r in rs]} for mode, rs in rounds.items()}
    print_table(args, results)


def print_table(args, results: dict) -> None:
    base = results["single"]
    kind = "LoRA r8" if args.lora else "full SFT"
    print(f"Llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, {kind}; global batch "
          f"{2 * args.micro} x {args.seq} tokens; CPU gloo; median of steps {args.warmup + 1}-{args.steps}")
    print(f"{'mode':7} {'tokens/s':>9} {'ratio':>6} {'peak RSS/rank MiB':>18} {'ratio':>6} "
          f"{'train RSS/rank MiB':>19} {'ratio':>6} {'state/rank MiB':>15} {'ratio':>6}")
    for mode, r in results.items():
        print(f"{mode:7} {r['tok_s']:9.0f} {r['tok_s'] / base['tok_s']:6.2f} {r['peak_rss']:18.0f} "
              f"{r['peak_rss'] / base['peak_rss']:6.2f} {r['train_rss']:19.0f} {r['train_rss'] / base['train_rss']:6.2f} "
              f"{r['state']:15.1f} {r['state'] / base['state']:6.2f}")
    if args.repeat > 1:
        print("tokens/s per round: " + "; ".join(f"{m} {', '.join(f'{t:.0f}' for t in r['rounds'])}"
                                                 for m, r in results.items()))


if __name__ == "__main__":
    main()
