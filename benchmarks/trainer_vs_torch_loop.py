"""Throughput of our Trainer (``llm.api.finetune``) against a hand-written torch loop, in one process.

Both train the same random Llama (saved to a temp folder, loaded by path) on the same batches
(two ``HFDatasetDataModule`` instances with the same arguments over one pre-tokenized dataset):
forward with ``use_cache=False``, token-weighted masked cross-entropy, backward, AdamW step,
zero_grad. The two loops run interleaved, step by step: a Trainer callback
(``on_train_step_end``) times the Trainer's step and then runs and times one hand-loop step, so
each pair of steps sees the same load on this shared, drifting VM. After a few untimed warm-up
steps, the reported ratio is the median of the per-step ratios. Set-up is excluded on both sides,
and both must end with the same weights (bit-identical in eager mode, within ``JIT_WEIGHT_ATOL``
with torch.compile): the benchmark fails otherwise, since then they did not do the same work.

    .venv/bin/python benchmarks/trainer_vs_torch_loop.py [--steps 20] [--warmup 2] [--lora] [--hidden 512 ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import fiddle as fdl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from nemo_automodel import lightning as nl  # noqa: E402
from nemo_automodel import llm  # noqa: E402

LR = 1e-4
# inductor's fused kernels round differently from eager's and AdamW (lr 1e-4) amplifies it: 3.5e-4 seen
# after 14 steps; a loose bound (eager runs must match bitwise)
JIT_WEIGHT_ATOL = 1e-3
SEED = 1234  # the Trainer's default seed: both loops seed torch with it before loading the model
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default 8192)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--batch", type=int, default=4, help="rows per step (default 4)")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each loop (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each loop before them (default 2)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default 0: torch's default); 1 is steadier on a busy machine")
    p.add_argument("--lora", action="store_true", help="LoRA r8 on the 7 projections instead of full SFT")
    p.add_argument("--jit", action="store_true", help="ours with JitTransform (torch.compile per decoder block)")
    return p.parse_args(argv)


# -- the model and the data -------------------------------------------------------------------
def save_tokenizer(out: Path, vocab: int) -> None:
    """A word-level tokenizer with ``vocab`` entries (the data is pre-tokenized; only pad/eos matter)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")
    fast.save_pretrained(out)


def save_model(out: Path, args: argparse.Namespace) -> None:
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.heads, max_position_embeddings=max(512, args.seq + 1),
                                   tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    save_tokenizer(out, args.vocab)


def make_dataset(args: argparse.Namespace) -> datasets.Dataset:
    """Random pre-tokenized rows (``seq + 1`` ids: the data module shifts them to ``seq`` positions)."""
    rows = args.batch * (args.warmup + args.steps)
    ids = np.random.default_rng(0).integers(3, args.vocab, size=(rows, args.seq + 1), dtype=np.int64)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def data_module(ds: datasets.Dataset, args: argparse.Namespace) -> llm.HFDatasetDataModule:
    return llm.HFDatasetDataModule(ds, seq_length=args.seq, micro_batch_size=args.batch,
                                   global_batch_size=args.batch, shuffle=True, seed=SEED)


def lora_config():
    return llm.peft.LoRA(target_modules=LORA_TARGETS, dim=8, alpha=32)


# -- (b) the hand-written loop ----------------------------------------------------------------
class HandLoop:
    """Plain torch: forward (no KV cache), token-weighted masked CE, backward, AdamW step, zero_grad."""

    def __init__(self, model_dir: Path, ds: datasets.Dataset, args: argparse.Namespace, tokenizer) -> None:
        torch.manual_seed(SEED)  # as the Trainer does before loading (LoRA's A matrices are random)
        module = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                   attn_implementation="sdpa")
        if args.lora:
            from peft import LoraConfig, get_peft_model

            module = get_peft_model(module, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, bias="none",
                                                       target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
        self.module = module.train()
        self.opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=LR, weight_decay=0.0,
                                     betas=(0.9, 0.999), eps=1e-8)
        data = data_module(ds, args)
        data.setup(tokenizer)
        self.batches = data.train_batches()

    def step(self) -> None:
        batch = next(self.batches)
        logits = self.module(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        losses = F.cross_entropy(logits.float().flatten(0, -2), batch["labels"].flatten(), reduction="none")
        mask = batch["loss_mask"].flatten()
        ((losses * mask).sum() / mask.sum()).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


# -- (a) our Trainer, with the hand loop's steps interleaved ----------------------------------
class Interleave:
    """Trainer callback: times each of the Trainer's steps, then runs and times one hand-loop step.

    The Trainer's step ``k`` is the time from the end of the previous callback to the start of
    this one (the whole loop iteration: batch, step, logging and preemption checks); the hand
    loop's step ``k`` runs right after it, so each pair sees the same machine load.
    """

    def __init__(self, hand: HandLoop) -> None:
        self.hand, self.ours_s, self.hand_s = hand, [], []
        self.last = 0.0

    def on_train_start(self, trainer, module) -> None:
        self.last = time.perf_counter()

    def on_train_step_end(self, trainer, step, metrics) -> None:
        t = time.perf_counter()
        self.ours_s.append(t - self.last)
        self.hand.step()
        t2 = time.perf_counter()
        self.hand_s.append(t2 - t)
        self.last = time.perf_counter()


def run_pair(model_dir: Path, ds: datasets.Dataset, args: argparse.Namespace, log_dir: str):
    model = llm.HFAutoModelForCausalLM(str(model_dir))
    hand = HandLoop(model_dir, ds, args, model.tokenizer)
    timer = Interleave(hand)
    callbacks = [timer]
    if args.jit:
        from nemo_automodel.trainer.jit import JitConfig, JitTransform

        callbacks.insert(0, JitTransform(JitConfig(use_torch=True)))
    llm.api.finetune(
        model=model,
        data=data_module(ds, args),
        trainer=nl.Trainer(max_steps=args.warmup + args.steps, log_every_n_steps=10**9, enable_progress_bar=False,
                           enable_checkpointing=False, callbacks=callbacks, seed=SEED),
        peft=lora_config() if args.lora else None,
        optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=LR)),
        log=nl.NeMoLogger(log_dir=log_dir, name="ours", tensorboard=False),
    )
    w = args.warmup
    return timer.ours_s[w:], timer.hand_s[w:], model.model, hand.module


# -- measurements ----------------------------------------------------------------------------
def matmul_peak(n: int = 2048, reps: int = 8) -> float:
    """Best fp32 GFLOP/s of an n x n matmul (after a warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops_per_token(module: torch.nn.Module) -> tuple[float, int]:
    """6·N for full SFT (4·N + 2·N_trainable with frozen weights); N counts matmul weights only
    (the input embedding table is a lookup). Attention scores are left out (a few % here)."""
    embed = module.get_input_embeddings().weight
    params = [p for p in module.parameters() if p is not embed]
    n = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return 4 * n + 2 * trainable, n


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("nemo_automodel").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokens_per_step = args.batch * args.seq
    mode = ("LoRA r8 (7 projections)" if args.lora else "full SFT") + (", ours with torch.compile" if args.jit else "")
    print(f"Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}, fp32, {mode}, batch "
          f"{args.batch}x{args.seq} = {tokens_per_step} tokens/step, {args.warmup} warm-up + {args.steps} timed "
          f"steps each (interleaved), torch threads={torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    peak_start = matmul_peak()

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        model_dir = Path(tmp) / "model"
        save_model(model_dir, args)
        ours_s, hand_s, ours_model, hand_model = run_pair(model_dir, make_dataset(args), args, tmp)
        diff = max_weight_diff(ours_model, hand_model)
        fpt, n_matmul = flops_per_token(hand_model)
    peak_end = matmul_peak()
    peak = max(peak_start, peak_end)

    allowed = JIT_WEIGHT_ATOL if args.jit else 0.0
    if not diff <= allowed:
        print(f"error: ours and the hand loop ended with different weights (max |diff| {diff:.1e} > {allowed}): "
              "they did not train the same steps, so their speeds are not comparable", file=sys.stderr)
        return 1
    ratios = [h / o for o, h in zip(ours_s, hand_s, strict=True)]  # tokens/s ours / tokens/s hand
    ratio = statistics.median(ratios)
    print(f"{'loop':<12}{'tokens/s':>10}{'median s/step':>15}{'min s/step':>12}{'GFLOP/s':>10}{'of peak':>9}")
    mfu = {}
    for name, secs in (("ours", ours_s), ("hand loop", hand_s)):
        tps = tokens_per_step / statistics.median(secs)
        gflops = tps * fpt / 1e9
        mfu[name] = gflops / peak
        print(f"{name:<12}{tps:>10.0f}{statistics.median(secs):>15.3f}{min(secs):>12.3f}{gflops:>10.1f}"
              f"{gflops / peak:>9.2f}")
    print(f"per-step ratios ours/hand: min {min(ratios):.3f}, median {ratio:.3f}, max {max(ratios):.3f}; "
          f"ratio of total times {sum(hand_s) / sum(ours_s):.3f}")
    print(f"({n_matmul / 1e6:.1f} M matmul params, {fpt / 1e6:.0f} MFLOP/token; fp32 2048^2 matmul peak "
          f"{peak:.0f} GFLOP/s (start {peak_start:.0f}, end {peak_end:.0f}); max |weight diff| ours vs hand "
          f"loop after training: {diff:.1e}; load average at the end {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs; run {time.perf_counter() - started:.0f} s)")
    print(f"ratio ours/hand-loop: {ratio:.2f} (goal >= 0.97; per step min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(f"ratio MFU ours (model FLOP/s ÷ fp32 matmul peak, 6·N per token): {mfu['ours']:.2f} "
          f"(hand loop {mfu['hand loop']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
