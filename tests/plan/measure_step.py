"""Peak memory growth of real CPU training steps, the ground truth of ``test_plan_vs_measured.py``.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/plan/measure_step.py '[{"arch": "llama", "lora": true, "ckpt": false, "seq": 1024}, …]'

For each case, in this one process: a tiny random model from `config(arch)` loaded through
``HFAutoModelForCausalLM`` (sdpa; fp32, or bf16 autocast with ``precision="bf16-mixed"``, bf16
weights with ``"bf16-true"``, a bitsandbytes 4-bit base with ``quantization``), LoRA or full
fine-tuning, activation checkpointing on or off; a warm-up training step on 64 tokens (kernels,
thread pools, and AdamW's state, which every later step finds in place), then one training step
(our loss, backward, gradient clipping, AdamW step, ``zero_grad(set_to_none=True)``) on one row of
``seq`` tokens. A thread samples the resident anonymous memory (``RssAnon``) every millisecond;
the peak minus the value just before the step is printed as ``RESULT {json}``. With
``MALLOC_MMAP_THRESHOLD_`` fixed, glibc serves every block above 64 KiB with its own mapping and
returns it on free, so the resident size follows the live tensors; before the step the heap's free
pages are trimmed, so smaller blocks count too rather than reusing an earlier case's. A first,
unreported step on 256 tokens takes the process's one-time allocations out of the first case.
The architectures: Llama, Qwen2, Gemma at hidden size 384, and the mixture-of-experts and
Mamba/hybrid families of ``tests/conftest.py`` (``TINY_FAMILIES``) with a 512-token vocabulary.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LORA = dict(target_modules=["*_proj"], dim=16, alpha=32)


def config(arch: str):
    """The tiny random model of an architecture (activations dominate the measurement's noise)."""
    import transformers

    common = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=4096, vocab_size=4096)
    if arch == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(tie_word_embeddings=True, **common)
    if arch == "gemma":
        return transformers.GemmaConfig(head_dim=64, **common)
    from tests.conftest import TINY_FAMILIES  # mixture-of-experts and Mamba/hybrid families

    return TINY_FAMILIES[arch](512)  # a small vocabulary: the layers, not the logits, dominate the step


def _trim_heap() -> None:
    """Give the heap's free pages back (glibc ``malloc_trim``): blocks under the mmap threshold (router
    logits, index vectors of a small model) then need new pages, as they would on an empty allocator,
    instead of reusing what earlier cases freed."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) * 1024


class _Peak:
    """The largest ``_rss_anon`` seen while the block runs (sampled every millisecond)."""

    def __enter__(self) -> _Peak:
        self.peak, self._stop = _rss_anon(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_anon())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())


def measure(arch: str, lora: bool, ckpt: bool, seq: int, folder: Path, precision: str = "32",
            quantization: str | None = None) -> dict:
    import torch
    import transformers

    from nemo_automodel.models import HFAutoModelForCausalLM
    from nemo_automodel.peft import LoRA
    from nemo_automodel.trainer.optim import default_optimizer

    has_flag = "activation_checkpointing" in inspect.signature(HFAutoModelForCausalLM).parameters
    if quantization:  # bitsandbytes quantizes while loading: the folder needs weights
        folder = folder.with_name(folder.name + "-weights")
        if not folder.exists():
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(config(arch)).save_pretrained(folder)
    extra = {"quantization": quantization} if quantization else {}
    wrapper = HFAutoModelForCausalLM(str(folder), load_pretrained_weights=bool(quantization),
                                     **({"activation_checkpointing": ckpt} if has_flag else {}), **extra)
    torch.manual_seed(0)
    true_bf16 = precision == "bf16-true"
    module = wrapper.configure_model("cpu", dtype=torch.bfloat16) if true_bf16 else wrapper.configure_model("cpu")
    if ckpt and not has_flag:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        module = wrapper.apply_peft(LoRA(**LORA))
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer, _ = default_optimizer().build(params, max_steps=10)
    vocab = module.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(1, seq),
             "position_ids": torch.arange(seq)[None]}

    def step(b: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = wrapper.loss(module, b)
        (loss / b["loss_mask"].sum()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step({k: v[:, :64] for k, v in batch.items()})  # warm-up: kernels, thread pools, AdamW's state
    gc.collect()
    _trim_heap()
    start = time.perf_counter()
    before = _rss_anon()
    with _Peak() as peak:
        step(batch)
    return {"arch": arch, "lora": lora, "ckpt": ckpt, "seq": seq, "precision": precision, "quantization": quantization,
            "growth": peak.peak - before,
            "seconds": time.perf_counter() - start}


def main(cases: list[dict]) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        config(cases[0]["arch"]).save_pretrained(Path(tmp) / "warm-up")
        measure(**{**cases[0], "seq": 256}, folder=Path(tmp) / "warm-up")  # the process's one-time allocations
        gc.collect()
        for case in cases:
            folder = Path(tmp) / case["arch"]
            if not folder.exists():
                config(case["arch"]).save_pretrained(folder)
            print("RESULT " + json.dumps(measure(folder=folder, **case)), flush=True)
            gc.collect()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(json.loads(sys.argv[1]))
