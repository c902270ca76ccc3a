# %% [markdown]
# # Vision-language fine-tuning with `nemo_automodel`: "What digit is this?"
#
# This walkthrough fine-tunes a vision-language model (VLM) on real images, on CPU, offline: the
# 1,797 handwritten digits that ship inside scikit-learn's wheel, asked as chats ("What digit is
# this?" + the image -> "7"). It uses NeMo 25.02's AutoModel names:
# `llm.HFAutoModelForImageTextToText`, an image-chat data module, `llm.api.finetune`.
#
# No pretrained VLM ships inside a PyPI wheel, so the model starts from random weights: a tiny
# Idefics3-shaped VLM built from a `transformers` config (`nemo_automodel.demo.tiny_vlm`). Its
# vision tower has to learn to see, so this is full SFT with the vision tower trained. With a real
# pretrained VLM (`--model HuggingFaceTB/SmolVLM-256M-Instruct`, needs the Hub) the same code runs.
#
# What you will see, top to bottom:
# 1. the data: a digit, its chat, and which tokens carry the loss (never the image tokens);
# 2. the base model's answers on the 180 held-out digits;
# 3. `llm.api.finetune(...)` exactly as in a NeMo 25.02 script;
# 4. the tuned model's answers on the same held-out digits, and the margin over the base;
# 5. the saved `checkpoints/last/model` reloaded with `AutoModelForImageTextToText`;
# 6. the same job as a lazily built recipe graph (`recipes/vlm_digits.py`).
#
# Run it as a script (`.venv/bin/python tutorials/vlm_digits.py --help`) or open it as a notebook.

# %%
import argparse
import shutil
from pathlib import Path

import fiddle as fdl
import torch
from fiddle import printing
from transformers import AutoModelForImageTextToText

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.demo import digits
from nemo_automodel.models.processor import load_processor
from nemo_automodel.tracking.metrics import read_metrics

# %% [markdown]
# ## Settings
#
# The defaults train for a few minutes on a laptop CPU; the test suite passes fewer steps.

# %%
parser = argparse.ArgumentParser(description="VLM fine-tuning walkthrough on handwritten digits")
parser.add_argument("--model", default=None, help="VLM folder or id (default: a tiny random Idefics3 VLM)")
parser.add_argument("--max-steps", type=int, default=400, help="optimizer steps")
parser.add_argument("--samples", type=int, default=None, help="training digits to use (default: all 1,617)")
parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine schedule)")
parser.add_argument("--out", default="tutorial_runs", help="output directory")
args, _ = parser.parse_known_args()  # "known": a Jupyter kernel adds flags of its own

OUT = Path(args.out)
MICRO_BATCH, SEQ_LENGTH = 16, 128
torch.manual_seed(0)
shutil.rmtree(OUT / "vlm-digits", ignore_errors=True)  # start fresh (AutoResume would continue it)

# %% [markdown]
# ## 1. The data
#
# `digit_chats` turns the wheel's `digits.csv.gz` into a `datasets.Dataset` with a `messages`
# column (an image part and the question, then the answer) and an `images` column (PIL images,
# 8x8 scaled to 32x32). The split is fixed: 1,617 digits to train on, 180 held out.

# %%
train = digits.digit_chats("train", limit=args.samples)
test = digits.digit_chats("test")
pixels, labels = digits.digit_arrays()
print(train)
print(f"the wheel's first digit, a {labels[0]}:\n{digits.ascii_digit(pixels[0])}")
print(train[0]["messages"])

# %% [markdown]
# The model: a folder with `config.json`, weights and a processor (tokenizer, image processor, chat
# template). `HFAutoModelForImageTextToText` reads nothing until the job runs.

# %%
model_path = args.model or str(digits.base_model_dir("idefics3"))
model = llm.HFAutoModelForImageTextToText(model_path, freeze_vision_tower=False)
processor = model.processor
print("model:", model_path, "| processor:", type(processor).__name__)

# %% [markdown]
# `llm.HFImageTextDataModule` renders each chat with the processor's chat template and encodes a
# micro-batch in one processor call, so everything the model family needs (`pixel_values`,
# `pixel_attention_mask`, ...) is in the batch. The loss is on the answer and the end-of-turn token
# only; image tokens and padding never train. Trained tokens are shown between `[[` and `]]`:

# %%
data = llm.HFImageTextDataModule(train, micro_batch_size=MICRO_BATCH, global_batch_size=MICRO_BATCH,
                                 seq_length=SEQ_LENGTH)
data.setup(processor)
batch = next(data.train_batches())
print({k: tuple(v.shape) for k, v in batch.items()})
tok = processor.tokenizer
ids, mask = batch["labels"][0], batch["loss_mask"][0]
pieces = [f"[[{tok.decode([int(t)])}]]" if m else tok.decode([int(t)]) for t, m in zip(ids, mask)]
print("".join(pieces).replace("<image>", "").strip())

# %% [markdown]
# ## 2. The base model on held-out digits
#
# `greedy_digit_accuracy` asks every held-out image and checks the first token greedy decoding
# would produce against the right digit. A random model knows no digit.

# %%
base_accuracy = digits.greedy_digit_accuracy(model.configure_model(), processor, test)
print(f"base model: {base_accuracy:.1%} of 180 held-out digits")

# %% [markdown]
# ## 3. Fine-tune, NeMo 25.02 style
#
# `peft=None` is full SFT; `freeze_vision_tower=False` (set in section 1) trains the vision tower too,
# which a random model needs. With a pretrained VLM keep the tower frozen (the default) and pass
# `peft=llm.peft.LoRA(target_modules=['*_proj'])`: targets resolve on the language model only.

# %%
run_dir = llm.api.finetune(
    model=model,
    data=data,
    peft=None,
    optim=fdl.build(llm.adam.pytorch_adam_with_cosine_annealing(max_lr=args.lr, warmup_steps=10)),
    trainer=nl.Trainer(max_steps=args.max_steps, log_every_n_steps=10, enable_progress_bar=False),
    log=nl.NeMoLogger(log_dir=str(OUT), name="vlm-digits"),
)
losses = [row["train_loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in row]
print(f"train loss: first {losses[0]:.3f} -> last {losses[-1]:.3f} over {args.max_steps} steps")

# %% [markdown]
# ## 4. The tuned model on the same held-out digits

# %%
tuned_accuracy = digits.greedy_digit_accuracy(model.model, processor, test)
print(f"tuned model: {tuned_accuracy:.1%} (base {base_accuracy:.1%}; chance 10%): "
      f"+{tuned_accuracy - base_accuracy:.1%}")

# %% [markdown]
# ## 5. The checkpoint is a plain Hugging Face folder
#
# `checkpoints/last/model` holds safetensors, config and the processor: it loads with
# `AutoModelForImageTextToText` and answers exactly like the model that was trained.

# %%
saved = run_dir / "checkpoints" / "last" / "model"
reloaded = AutoModelForImageTextToText.from_pretrained(saved, dtype=torch.float32)
reloaded_accuracy = digits.greedy_digit_accuracy(reloaded, load_processor(str(saved)), test)
print(f"reloaded from {saved}: {reloaded_accuracy:.1%}")

# %% [markdown]
# ## 6. The same job as a recipe graph
#
# `recipes/vlm_digits.py` builds this job as a lazily built Fiddle graph: the model folder and the
# dataset are nodes too, so nothing is built or read until the job runs. Run it with
# `.venv/bin/python recipes/vlm_digits.py --yes`, on Slurm with `run.executor=slurm`, or sweep it.

# %%
from recipes.vlm_digits import finetune_recipe  # noqa: E402

recipe = finetune_recipe(dir=str(OUT), max_steps=args.max_steps, lr=args.lr)
for line in printing.as_str_flattened(recipe).splitlines():
    if "unset" not in line:  # hide arguments left at their defaults
        print(" ", line)
