# %% [markdown]
# # One recipe, two backends: AutoModel ⇄ Megatron-Core
#
# The AutoModel path trains any Hugging Face model on day 0. Megatron-Core gives the highest
# throughput for the popular families at scale (tensor parallelism splits every layer across
# GPUs). `nemo_automodel.megatron.swap.to_megatron` moves a working recipe over with one call: the
# model node becomes a Megatron GPT model built from the same weights, the optimizer node a
# Megatron optimizer module with the same hyper-parameters, the strategy Megatron's. PEFT and
# data nodes stay as they are. `to_automodel` moves it back.
#
# Run it as a script (`.venv/bin/python tutorials/backend_swap.py --help`) or as a notebook.
# On CPU it runs with tensor_parallel=1 (the tests check TP=2 over two processes).

# %%
import argparse
import shutil
from pathlib import Path

import fiddle as fdl
import torch
from nemo_run.core.serialization.yaml import YamlSerializer
from peft import PeftModel
from transformers import AutoModelForCausalLM

from nemo_automodel.demo import assets
from nemo_automodel.megatron.swap import to_automodel, to_megatron
from nemo_automodel.tracking.metrics import read_metrics
from recipes.hf_auto_model_for_causal_lm import finetune_recipe

# %% [markdown]
# ## Settings

# %%
parser = argparse.ArgumentParser(description="AutoModel <-> Megatron-Core backend swap walkthrough")
parser.add_argument("--model", default=None, help="HF Llama/Mistral/Qwen2 folder (default: embedded SmolLM2-135M)")
parser.add_argument("--max-steps", type=int, default=6, help="optimizer steps per backend")
parser.add_argument("--samples", type=int, default=200, help="chat samples to train on")
parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
parser.add_argument("--out", default="tutorial_runs", help="output directory")
args, _ = parser.parse_known_args()

OUT = Path(args.out)
for name in ("swap-automodel", "swap-megatron"):
    shutil.rmtree(OUT / name, ignore_errors=True)
model_path = args.model or str(assets.smollm2_hf_dir())
data_dir = OUT / "swap-data"
assets.demo_chat_dataset(limit=args.samples).save_to_disk(str(data_dir))

# %% [markdown]
# ## 1. An AutoModel recipe
#
# A lazy graph: building it reads nothing. LoRA on every projection (`'*_proj'`) plus the
# Megatron name of the fused attention input (`'linear_qkv'`), so the same list means the same
# layers on both backends.


# %%
def recipe(name: str):
    r = finetune_recipe(model_id=model_path, dataset=str(data_dir), formatting="chat", peft_scheme="lora",
                        dir=str(OUT), name=name, max_steps=args.max_steps, lr=args.lr, seq_length=256,
                        micro_batch_size=2, global_batch_size=2)
    r.trainer.log_every_n_steps = 1
    r.peft.target_modules = ["*_proj", "linear_qkv"]
    return r


def show(label: str, node, indent: str = "  ") -> None:
    """A graph node: its class and the arguments set on it (nested nodes indented)."""
    print(f"{label}: {getattr(fdl.get_callable(node), '__name__', fdl.get_callable(node))}")
    for name, value in node.__arguments__.items():
        if isinstance(value, fdl.Buildable):
            show(indent + name, value, indent + "  ")
        else:
            print(f"{indent}{name} = {value!r}")


auto = recipe("swap-automodel")
show("model", auto.model)
show("optim", auto.optim)

# %% [markdown]
# ## 2. Rewrite it for Megatron-Core
#
# `to_megatron` returns a new graph and leaves `auto` untouched. The model keeps its
# `model_id`: the HF weights are converted where the job runs (q/k/v fused per query group into
# `linear_qkv`, gate/up into `linear_fc1`). If the architecture had no Megatron mapping, this
# call would fail now, naming what is missing.

# %%
megatron = to_megatron(recipe("swap-megatron"), tensor_parallel=1)
show("model", megatron.model)
show("optim", megatron.optim)
show("strategy", megatron.trainer.strategy)
back = to_automodel(megatron)
back.log.name = "swap-automodel"
print("to_automodel(to_megatron(recipe)) == recipe:", back == auto)
for name, graph in (("recipe", auto), ("megatron", megatron), ("round-trip", back)):
    (OUT / f"swap-{name}.yaml").write_text(YamlSerializer().serialize(graph))
print(f"graphs written as YAML (what NeMo-Run records for a job): {OUT}/swap-{{recipe,megatron,round-trip}}.yaml")

# %% [markdown]
# ## 3. Train both
#
# Same weights, same data order, same optimizer: the first loss agrees (LoRA's B starts at zero).
# The adapters' random A matrices are drawn from different generators on the two backends, so
# the later losses differ slightly; both fall.

# %%
runs = {"automodel": fdl.build(auto)(), "megatron": fdl.build(megatron)()}
for backend, run_dir in runs.items():
    losses = [row["train_loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in row]
    print(f"{backend:9s} losses: " + " ".join(f"{x:.4f}" for x in losses))

# %% [markdown]
# ## 4. The Megatron run's adapter is a plain PEFT adapter
#
# Its checkpoint holds `hf_adapter/` with Hugging Face module names (`q_proj`, `k_proj`, ...),
# split back out of Megatron's fused layers. transformers + peft (or vLLM) load it directly.

# %%
adapter = runs["megatron"] / "checkpoints" / "last" / "hf_adapter"
tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), adapter).eval()
print("adapter layers:", sorted({k.split(".")[-1] for k in tuned.peft_config["default"].target_modules}))
ids = torch.arange(16)[None] + 100
with torch.no_grad():
    print("next-token logits (first 5):", tuned(input_ids=ids).logits[0, -1, :5].tolist())
