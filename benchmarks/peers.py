"""Ours vs HF ``transformers.Trainer`` vs TRL ``SFTTrainer`` on real chat data, like with like.

SmolLM2-135M-Instruct (``assets.smollm2_hf_dir()``), LoRA r16 on the 7 projections, AdamW lr 1e-4,
the demo chat data (chatterbot + HumanEval, 33-512 tokens) in SmolLM2's chat template, max length
512. Every peer's settings are set explicitly, never left at a library default, and printed per
worker (``CONFIG`` lines): precision (``-bf16`` workers: bf16 autocast over fp32 weights; the rest
fp32), packing, rows per step, gradient checkpointing (off everywhere). Groups compare like with
like: packed ours vs packed TRL in fp32 and in bf16 (2 rows of 512 per step), and unpacked ours vs
HF Trainer on the same batches (8 padded rows per step, both in file order). Throughput counts
non-pad tokens only.

The ``-moe`` pair trains a mixture-of-experts model instead: a random Qwen3-MoE from transformers' config
(``MOE``; seed 0, saved by each worker), full SFT in fp32, pre-tokenized random rows of equal length (no padding,
no packing) read in file order by both, router load-balancing loss on in both (the config's coefficient), gradient
clipping at 1.0 in both: ours ÷ HF ``Trainer`` on the same batches. Its ``CONFIG`` lines name the experts
implementation each side got.

Each framework runs in its own process (TRL lives only in ``.venv-bench/site``, never in
``.venv``). The processes of a group run in lockstep: the driver lets step k of each worker run
one after another (the others wait, idle), so load drift on this shared VM hits all of them
alike. The warm-up steps are dropped; a ratio is the median of the per-step tokens/s ratios
against the group's first worker; step wall time only (set-up excluded).

    .venv/bin/python benchmarks/peers.py [--steps 3] [--warmup 1] [--groups "ours,hf,trl;ours,ours-bf16"]
    .venv/bin/python benchmarks/peers.py --groups ours-moe,hf-moe --steps 20 --warmup 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

ROOT = Path(__file__).resolve().parents[1]
BENCH_SITE = ROOT / ".venv-bench" / "site"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_LEN, LR = 512, 1e-4
WORKERS = ("ours", "ours-padded", "ours-bf16", "ours-chunked", "hf", "trl", "trl-bf16", "ours-moe", "hf-moe")
GROUPS = "ours,trl;ours-bf16,trl-bf16;ours-padded,hf;ours,ours-padded,ours-bf16"
# the -moe pair: a random Qwen3-MoE (every layer sparse), rows of `seq` tokens, `batch` rows per step
MOE = dict(hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, experts=8, top_k=2, expert_ffn=128, vocab=4096,
           seq=128, batch=4)


def _config(**settings) -> None:
    """Announce a worker's settings (the driver prints them): nothing compared is left implicit."""
    print("CONFIG " + json.dumps(settings), flush=True)


def _rows(args) -> list[list[dict]]:
    from nemo_automodel.demo.assets import demo_chat_dataset

    n = 8 * (args.warmup + args.steps) * 2  # enough rows for every worker's steps
    return demo_chat_dataset(limit=n, seed=0)["messages"]


def _quiet() -> None:
    import logging
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# -- workers: each returns (non-pad tokens, seconds) over the timed steps ----------------------
def _gate() -> None:
    """In lockstep mode, wait for the driver's go before each step."""
    if os.environ.get("PEERS_LOCKSTEP"):
        print("READY", flush=True)
        sys.stdin.readline()


def _report(tokens: int, secs: float) -> None:
    if os.environ.get("PEERS_LOCKSTEP"):
        print(f"STEP {tokens} {secs}", flush=True)


def _finetune_ours(args: argparse.Namespace, name: str, model: Any, data: Any, peft: Any, precision: str,
                   **trainer_kw: Any) -> tuple[int, float]:
    """``llm.api.finetune`` with each optimizer step gated (lockstep) and timed; returns the timed steps' totals."""
    import fiddle as fdl

    from nemo_automodel import lightning as nl
    from nemo_automodel import llm

    times, seen = [], []

    class Timed(nl.Trainer):
        def _train_step(self, *a):
            _gate()
            t = time.perf_counter()
            out = super()._train_step(*a)
            times.append(time.perf_counter() - t)
            seen.append(out[2])
            _report(seen[-1], times[-1])
            return out

    llm.api.finetune(model=model, data=data, peft=peft, optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=LR)),
                     trainer=Timed(max_steps=args.warmup + args.steps, log_every_n_steps=10**9,
                                   enable_progress_bar=False, enable_checkpointing=False, precision=precision,
                                   **trainer_kw),
                     log=nl.NeMoLogger(log_dir=args.tmp, name=name, tensorboard=False))
    return sum(seen[args.warmup:]), sum(times[args.warmup:])


def run_ours(args, variant: str) -> tuple[int, float]:
    import datasets

    from nemo_automodel import llm
    from nemo_automodel.demo import assets

    packed = variant != "ours-padded"
    precision = "bf16-mixed" if variant == "ours-bf16" else "32"
    _config(precision=precision, packing=packed, rows_per_step=2 if packed else 8, order="shuffled" if packed else
            "file", gradient_checkpointing=False, chunked_loss=variant == "ours-chunked")
    model = llm.HFAutoModelForCausalLM(str(assets.smollm2_hf_dir()), chunked_loss=variant == "ours-chunked")
    # unpacked: file order, so the HF Trainer group sees the same 8 rows per step
    data = llm.HFDatasetDataModule(datasets.Dataset.from_dict({"messages": _rows(args)}), formatting="chat",
                                   seq_length=MAX_LEN, micro_batch_size=2 if packed else 8,
                                   packed_sequence_size=MAX_LEN if packed else 0, seed=0, shuffle=packed)
    return _finetune_ours(args, variant, model, data, llm.peft.LoRA(target_modules=LORA_TARGETS, dim=16, alpha=32),
                          precision)


def _moe_model(args: argparse.Namespace) -> tuple[Path, datasets.Dataset]:
    """Save the ``MOE`` Qwen3-MoE (seed 0: the same weights in every worker) with a word-level tokenizer to
    ``args.tmp``; return its folder and the pre-tokenized rows (``seq + 1`` ids each) both workers read."""
    import torch
    import transformers
    from trainer_vs_torch_loop import make_dataset, save_tokenizer

    m, out = MOE, Path(args.tmp) / "qwen3-moe"
    settings: dict[str, Any] = dict(
        vocab_size=m["vocab"], hidden_size=m["hidden"], num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"], head_dim=m["head_dim"], num_experts=m["experts"],
        num_experts_per_tok=m["top_k"], moe_intermediate_size=m["expert_ffn"], intermediate_size=2 * m["expert_ffn"],
        max_position_embeddings=max(512, m["seq"] + 1), tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        bos_token_id=None)
    cfg = transformers.Qwen3MoeConfig(**settings)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    save_tokenizer(out, m["vocab"])
    rows = make_dataset(argparse.Namespace(batch=m["batch"], seq=m["seq"], vocab=m["vocab"], warmup=args.warmup,
                                           steps=args.steps))
    return out, rows


def _moe_settings(experts: str) -> None:
    _config(model="Qwen3-MoE " + ",".join(f"{k}={v}" for k, v in MOE.items()), precision="32", training="full SFT",
            packing=False, padding=False, rows_per_step=MOE["batch"], order="file", gradient_checkpointing=False,
            router_aux_loss=True, grad_clip=1.0, experts_implementation=experts)


def run_ours_moe(args: argparse.Namespace) -> tuple[int, float]:
    from nemo_automodel import llm

    folder, rows = _moe_model(args)
    model = llm.HFAutoModelForCausalLM(str(folder))
    hf: Any = model.configure_model()  # loaded as finetune would (it reuses it)
    _moe_settings(hf.config._experts_implementation)
    data = llm.HFDatasetDataModule(rows, seq_length=MOE["seq"], micro_batch_size=MOE["batch"],
                                   global_batch_size=MOE["batch"], shuffle=False, seed=0)
    return _finetune_ours(args, "ours-moe", model, data, None, "32", gradient_clip_val=1.0)


def _hf_model():
    import transformers
    from peft import LoraConfig, get_peft_model

    from nemo_automodel.demo import assets

    model = transformers.AutoModelForCausalLM.from_pretrained(assets.smollm2_hf_dir(), attn_implementation="sdpa")
    model.config.use_cache = False
    return model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                             task_type="CAUSAL_LM"), get_peft_model


def _timed_trainer(base):
    """A subclass of an HF trainer class that counts non-pad tokens, and a callback timing each step
    (``training_step`` + optimizer step); both append to the returned ``seen``/``clock.times``."""
    import transformers

    seen: list[int] = []

    class Clock(transformers.TrainerCallback):
        def __init__(self):
            self.t0, self.times = 0.0, []

        def on_step_begin(self, *a, **k):
            _gate()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)
            _report(seen[-1], self.times[-1])

    class Timed(base):
        def training_step(self, model, inputs, *a, **k):
            mask = inputs.get("attention_mask")
            seen.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *a, **k)

    return Timed, Clock(), seen


def _common_args(args, bf16: bool, **kw):
    """Settings both HF Trainer and TRL take; precision and gradient checkpointing explicit (TRL 1.16's
    SFTConfig defaults to bf16=True and gradient_checkpointing=True on CPU)."""
    return dict(output_dir=args.tmp, max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant",
                weight_decay=0.0, logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
                dataloader_num_workers=0, disable_tqdm=True, seed=0, bf16=bf16, fp16=False,
                gradient_checkpointing=False, **kw)


def _train_hf(args: argparse.Namespace, model: Any, ds: datasets.Dataset, collator: Any, rows_per_step: int,
              **kw: Any) -> tuple[int, float]:
    """HF ``Trainer`` over ``ds`` in file order, fp32, each step gated (lockstep) and timed."""
    import transformers

    Timed, clock, seen = _timed_trainer(transformers.Trainer)
    trainer = Timed(model=model, train_dataset=ds, callbacks=[clock], data_collator=collator,
                    args=transformers.TrainingArguments(**_common_args(
                        args, bf16=False, per_device_train_batch_size=rows_per_step,
                        train_sampling_strategy="sequential", **kw)))
    trainer.train()
    return sum(seen[args.warmup:]), sum(clock.times[args.warmup:])


def run_hf(args) -> tuple[int, float]:
    import datasets
    import transformers

    model, lora, get_peft_model = _hf_model()
    tok = transformers.AutoTokenizer.from_pretrained(model.config._name_or_path)

    def encode(msgs):
        ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)[:MAX_LEN]
        n_prompt = len(tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True, return_dict=False))
        return {"input_ids": ids, "labels": [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]}

    ds = datasets.Dataset.from_list([encode(m) for m in _rows(args)])
    _config(precision="32", packing=False, rows_per_step=8, order="file", gradient_checkpointing=False)
    return _train_hf(args, get_peft_model(model, lora), ds, transformers.DataCollatorForSeq2Seq(tok, padding=True), 8)


def run_hf_moe(args: argparse.Namespace) -> tuple[int, float]:
    import torch
    import transformers

    folder, rows = _moe_model(args)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model.config.output_router_logits = True  # adds router_aux_loss_coef * aux_loss to the loss, as ours does
    _moe_settings(model.config._experts_implementation)
    # our data module's shift: inputs ids[:-1], targets ids[1:] (the Trainer takes collated `shift_labels` as they are)
    ds = rows.map(lambda r: {"input_ids": r["input_ids"][:-1], "labels": r["input_ids"][:-1],
                             "shift_labels": r["input_ids"][1:]})
    return _train_hf(args, model, ds, transformers.default_data_collator, MOE["batch"], remove_unused_columns=False,
                     max_grad_norm=1.0)


def run_trl(args, bf16: bool) -> tuple[int, float]:
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    model, lora, _ = _hf_model()
    tok = transformers.AutoTokenizer.from_pretrained(model.config._name_or_path)
    ds = datasets.Dataset.from_list([{"prompt": m[:1], "completion": m[1:]} for m in _rows(args)])
    Timed, clock, seen = _timed_trainer(SFTTrainer)
    settings = dict(packing=True, packing_strategy="bfd", padding_free=False, max_length=MAX_LEN, loss_type="nll",
                    completion_only_loss=True)
    _config(precision="bf16-mixed" if bf16 else "32", rows_per_step=2, order="shuffled", gradient_checkpointing=False,
            **settings)
    cfg = SFTConfig(**_common_args(args, bf16=bf16, per_device_train_batch_size=2), **settings)
    trainer = Timed(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora,
                    callbacks=[clock])
    trainer.train()
    return sum(seen[args.warmup:]), sum(clock.times[args.warmup:])


def worker(args) -> None:
    import tempfile

    import torch

    _quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        args.tmp = tmp
        torch.manual_seed(0)
        if args.worker == "hf":
            tokens, secs = run_hf(args)
        elif args.worker == "hf-moe":
            tokens, secs = run_hf_moe(args)
        elif args.worker == "ours-moe":
            tokens, secs = run_ours_moe(args)
        elif args.worker.startswith("trl"):
            tokens, secs = run_trl(args, bf16=args.worker == "trl-bf16")
        else:
            tokens, secs = run_ours(args, args.worker)
    print("RESULT " + json.dumps({"tokens": tokens, "seconds": secs}), flush=True)


# -- driver ------------------------------------------------------------------------------
CONFIGS: dict[str, str] = {}


def _read(proc, prefix: str, name: str = "") -> str | None:
    for line in proc.stdout:
        if line.startswith("CONFIG "):
            CONFIGS[name] = line[7:].strip()
        if line.startswith(prefix):
            return line
    return None


def lockstep(names: list[str], args) -> dict[str, list[tuple[int, float]]]:
    """Start one worker per name, then run step k of every worker one after another, for each k:
    all frameworks see the same load drift. Returns per-step (tokens, seconds) per worker."""
    import tempfile

    procs, logs = {}, {}
    for name in names:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PEERS_LOCKSTEP="1")
        if name.startswith("trl"):
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_SITE), env.get("PYTHONPATH")]))
        logs[name] = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads)]
        procs[name] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=logs[name], text=True)
    steps: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    for _ in range(args.warmup + args.steps):
        for name, proc in list(procs.items()):
            if _read(proc, "READY", name) is None:
                logs[name].seek(0)
                print(f"  {name}: failed: {' | '.join(logs[name].read().strip().splitlines()[-3:])}", flush=True)
                procs.pop(name)
                continue
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = _read(proc, "STEP ")
            if line is None:
                procs.pop(name)
                continue
            _, tokens, secs = line.split()
            steps[name].append((int(tokens), float(secs)))
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    return {n: v[args.warmup:] for n, v in steps.items() if n in procs}


LABELS = {"hf": "HF Trainer (padded, same batches)", "trl": "TRL SFTTrainer (packed)",
          "trl-bf16": "TRL SFTTrainer bf16 (packed)", "ours-padded": "ours without packing", "ours-bf16": "ours bf16",
          "ours-chunked": "ours chunked loss", "ours-moe": "ours (Qwen3-MoE, full SFT)",
          "hf-moe": "HF Trainer (Qwen3-MoE, same batches)"}


def report(group: list[str], args) -> None:
    print(f"group {group}: {args.warmup}+{args.steps} steps in lockstep, load {os.getloadavg()[0]:.1f}", flush=True)
    got = lockstep(group, args)
    for name, st in got.items():
        tok, sec = sum(t for t, _ in st), sum(s for _, s in st)
        print(f"  {name:<13} {tok / sec:8.1f} non-pad tok/s ({tok} tokens in {sec:.1f} s)  {CONFIGS.get(name, '')}")
    ref = group[0]
    for other in group[1:]:
        if ref not in got or other not in got:
            continue
        per_step = sorted((t1 / s1) / (t2 / s2) for (t1, s1), (t2, s2) in zip(got[ref], got[other]))
        if other in ("ours-bf16", "ours-chunked"):  # the variant over ours
            per_step, title = sorted(1 / r for r in per_step), f"{LABELS[other]} ÷ {ref}"
        else:
            title = f"{LABELS.get(ref, ref)} ÷ {LABELS[other]}"
        print(f"ratio {title}: {statistics.median(per_step):.2f} (median of {len(per_step)} per-step ratios; "
              f"min {per_step[0]:.2f}, max {per_step[-1]:.2f})")
    print(f"(load average at the end {os.getloadavg()[0]:.1f})", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per worker (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--groups", default=GROUPS,
                   help=f"';'-separated groups of {WORKERS}, each run in lockstep; ratios vs the first")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (default 0: torch's default); 1 is steadier on a busy machine")
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    groups = [[n for n in g.split(",") if n] for g in args.groups.split(";")]
    if not (BENCH_SITE / "trl").is_dir():
        print(f"TRL is not installed in {BENCH_SITE} (make bench installs it); skipping it")
        groups = [[n for n in g if not n.startswith("trl")] for g in groups]
    print(f"SmolLM2-135M LoRA r16, fp32 unless named -bf16, demo chat data; -moe: random Qwen3-MoE, full SFT, fp32; "
          f"{os.cpu_count()} CPUs, torch threads per worker {args.threads or 'default'}", flush=True)
    t0 = time.perf_counter()
    for group in groups:
        report(group, args)
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
