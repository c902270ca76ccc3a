"""Real CPU training under ``Trainer(fit_memory=...)``, the ground truth of ``test_fit_memory.py``.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/plan/fit_run.py OUT_DIR TOKENIZER_DIR '[{"arch": "llama", "fraction": 0.7}, …]'

For each case, in this one process: a tiny random model of ``arch`` (saved with the tokenizer's files), full
fine-tuning on pre-tokenized rows that fill every micro-batch (4 x ``SEQ`` tokens, global batch 4), in fp32
(``precision="32"``: the choice does not depend on the CPU), given ``fit_memory`` = ``fraction`` x the planner's
estimate of the job as configured. One optimizer step through ``finetune``; a thread samples ``RssAnon``
(``measure_step._Peak``), and the peak minus the value just before ``finetune`` (after ``gc`` and
``malloc_trim``) is printed with the budget and what the trainer printed, as ``RESULT {json}``. The weights load,
the data set-up and the whole step are inside the measurement. A first, unreported run on short rows takes the
process's one-time allocations (thread pools, kernels, datasets) out of the first case.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SEQ, MICRO, GLOBAL = 512, 4, 4


def config(arch: str):
    """Tiny random models whose default step peaks at a few hundred MiB (activations and logits dominate)."""
    import transformers

    common = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, vocab_size=8192, tie_word_embeddings=False)
    if arch == "llama":
        return transformers.LlamaConfig(intermediate_size=384, **common)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(intermediate_size=384, moe_intermediate_size=128, num_experts=4,
                                           num_experts_per_tok=2, head_dim=32, **common)
    raise ValueError(arch)


def _model(folder: Path, arch: str, tokenizer: Path) -> Path:
    import torch
    import transformers

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config(arch)).save_pretrained(folder)
        shutil.copytree(tokenizer, folder, dirs_exist_ok=True)
    return folder


def _rows(path: Path, seq: int, n: int, vocab: int) -> Path:
    """``n`` rows of ``seq + 1`` random token ids: every micro-batch is full (no padding)."""
    import torch

    ids = torch.randint(3, vocab, (n, seq + 1), generator=torch.Generator().manual_seed(0)).tolist()
    path.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids))
    return path


def job(arch: str, folder: Path, data: Path, seq: int, fit_memory: str | None, log_dir: Path, name: str):
    from nemo_automodel.data import HFDatasetDataModule
    from nemo_automodel.models import HFAutoModelForCausalLM
    from nemo_automodel.trainer import NeMoLogger, Trainer

    model = HFAutoModelForCausalLM(str(folder))
    dm = HFDatasetDataModule(str(data), formatting=None, seq_length=seq, micro_batch_size=MICRO,
                                 global_batch_size=GLOBAL, shuffle=False)
    trainer = Trainer(max_steps=1, precision="32", accelerator="cpu", fit_memory=fit_memory,
                          enable_progress_bar=False, enable_checkpointing=False)
    log = NeMoLogger(log_dir=str(log_dir), name=name, tensorboard=False)
    return model, dm, trainer, log


def default_estimate(arch: str, folder: Path, seq: int) -> float:
    from nemo_automodel.plan import TrainingJob, estimate

    return estimate(TrainingJob(str(folder), precision="32", device="cpu", micro_batch_size=MICRO, seq_length=seq,
                                accumulate=GLOBAL // MICRO)).total


def run(arch: str, fraction: float, out: Path, tokenizer: Path, seq: int = SEQ) -> dict:
    from nemo_automodel.api import finetune
    from tests.plan.measure_step import _Peak, _rss_anon, _trim_heap

    folder = _model(out / arch, arch, tokenizer)
    data = out / f"rows-{seq}.jsonl"
    if not data.exists():
        _rows(data, seq, 2 * GLOBAL, config(arch).vocab_size)
    default = default_estimate(arch, folder, seq)
    budget = int(default * fraction)
    model, dm, trainer, log = job(arch, folder, data, seq, f"{budget / 2**20:.1f}MiB", out / "runs",
                                  f"{arch}-{fraction}")
    printed = io.StringIO()
    gc.collect()
    _trim_heap()
    before = _rss_anon()
    with _Peak() as peak, contextlib.redirect_stdout(printed):
        run_dir = finetune(model=model, data=dm, trainer=trainer, log=log)
    losses = [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in line]
    return {"arch": arch, "fraction": fraction, "default": default, "budget": float(f"{budget / 2**20:.1f}") * 2**20,
            "growth": peak.peak - before, "lines": [ln for ln in printed.getvalue().splitlines()
                                                    if ln.startswith("fit_memory")],
            "micro_batch_size": dm.micro_batch_size, "checkpointing": model.activation_checkpointing,
            "chunked_loss": bool(model.chunked_loss), "losses": losses}


def main(out: Path, tokenizer: Path, cases: list[dict]) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    run(cases[0]["arch"], 3.0, out, tokenizer, seq=64)  # the process's one-time allocations (fits as it is)
    gc.collect()
    for case in cases:
        print("RESULT " + json.dumps(run(out=out, tokenizer=tokenizer, **case)), flush=True)
        gc.collect()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))
