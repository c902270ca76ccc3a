"""The memory planner: before launch, whether a fine-tuning job fits in device memory, and what to change.

    from nemo_automodel.plan import plan_memory
    print(plan_memory("meta-llama/Meta-Llama-3-8B", peft="lora", precision="bf16-true", seq_length=4096,
                      devices=8, gpu_memory="80GiB"))
    # a recipe graph: nemo_automodel.launch.plan_recipe.plan_recipe(recipe, gpus=8, gpu_memory="80GiB")
    # the command line: nemo automodel plan <recipe | model id | folder> --gpus 8 --gpu-memory 80GiB --seq 4096

``Trainer(fit_memory="80GiB" | "auto")`` applies the cheapest changes that fit a budget to the job before any weight
loads (``fit.py``). It works from the Hugging Face config alone. The accounting, per device, at the moment of the peak:

- **The step is rehearsed on the meta device** (``rehearsal.py``): the model is built on meta
  (``meta_model.py``; no weight is read), gets activation checkpointing and the PEFT method the way
  the real model does, and runs forward, our real loss (``models.loss`` or the chunked loss) and
  backward. Every storage an op allocates is counted until it is freed, so activations, the
  gradients autograd passes between layers, recomputation under checkpointing and the logits /
  loss tensors are those of the real step, for any architecture transformers can run on meta.
  Attention is given the memory of the kernel the real run uses (flash / memory-efficient on a
  GPU; on a CPU what its dispatcher picks), not meta's math fallback; autocast is emulated.
  Mixture-of-experts layers run transformers' default experts kernel (``grouped_mm``: the tokens
  sorted by expert, each token once per routed expert, top-k rows in all), so the routed tokens'
  activations, the sort/scatter buffers, the router logits and the router load-balancing loss
  (``HFAutoModelForCausalLM`` adds it for a family with a router; ``router_aux_loss_coef=0`` drops
  it) are the real step's; LoRA on the fused experts (peft's ``target_parameters``) folds its
  factors into a per-layer copy of the expert weights, as peft does. Mamba / hybrid layers run
  transformers' PyTorch chunked scan (what runs without the mamba-ssm kernels: a GPU with them keeps
  less, a note says so), so their scan states and intermediate tensors are counted, not attention;
  packed rows on them are refused as the trainer refuses them.
  When all decoder layers are identical, three are rehearsed and the timeline is extended to all
  of them (the extra layers' activations stay alive from the top layer's forward to its backward,
  their gradients accumulate in the lower layers' backward); the result equals rehearsing all.
- **Weights**: every parameter once, in the job's weight dtype (``torch_dtype``, bf16 under
  ``bf16-true``); LoRA adapters in their own dtype (fp32: peft keeps them fp32 on a bf16 base).
  Under ``quantization`` (QLoRA) every frozen linear weight but the output layer takes 4.5 bits
  (4-bit codes + an fp32 absmax per 64 weights; about 4.13 with double quantization), the rest
  (embeddings, norms, output layer) stays in the weight dtype, as ``models/quantization.py``
  leaves it. The rehearsal gives the 4-bit layers bitsandbytes' behaviour: the input is cast to
  the compute dtype, the weight dequantized into a temporary per matmul, no activation kept.
- **Gradients**: one per trainable parameter, in its dtype; LoRA has none for the base. During
  forward/backward only those already produced at the peak moment count (as rehearsed); in the
  optimizer step all of them. With gradient accumulation all are alive in every micro-batch.
- **Optimizer state**: AdamW keeps ``exp_avg`` and ``exp_avg_sq`` like each trainable parameter
  (fp32 adapters: fp32; full ``bf16-true``: bf16). During the step, the foreach implementation
  (GPU) makes one temporary shaped like all trainable parameters of a dtype; the CPU's
  per-parameter loop two shaped like the largest one.
- **Peak** = the larger of forward/backward (weights + optimizer state + the rehearsed peak of
  activations, logits + loss and gradients so far) and the optimizer step (weights + gradients +
  optimizer state + its temporaries).
- **Strategy**: DDP holds a full replica plus its gradient buckets (a second copy of the
  gradients). FSDP2 over ``n`` ranks divides weights, gradients and optimizer state by ``n``, and
  adds what is gathered whole: the root module (embeddings, output layer, final norm: gathered
  from forward to backward; its gradients are reduce-scattered only at the end), two decoder
  layers (the current and the prefetched one, in the compute dtype) and one layer's fp32
  gradients before their reduce-scatter.
- **Tensor parallel** (``TrainingJob.tensor_parallel`` T, ``FSDP2Strategy(tensor_parallel_size=T)``): the
  meta model gets one TP rank's shapes by the plan the real run applies (the model's
  ``base_model_tp_plan`` or ``tp_plan``, LoRA per part; ``meta_model.shard_tensor_parallel``), so
  weights, gradients and optimizer state of the planned Linear layers divide by T, embeddings, norms
  and the output layer (outside transformers' base plans) stay whole, and the rehearsed activations
  are one rank's: the projections' outputs and attention on the local heads, the residual stream
  and norms whole. FSDP2 then shards over the devices / T other ranks. Approximated: the
  all-reduce of a rowwise layer's partial output, and DTensor/collective buffers, are not counted.
- **Context parallel** (``TrainingJob.context_parallel`` C, CUDA, unpacked rows): a row is padded to a
  multiple of 2 x C and each rank rehearses its S / C tokens (activations, logits and loss are one
  rank's); FSDP2 shards over dp x cp. Approximated: ring attention's transient copies of the other
  ranks' keys and values (about two local k/v blocks) are not counted.
- **CUDA context**: 1 GiB for the CUDA context and cuBLAS/cuDNN workspaces (not allocated by
  torch, still on the GPU), 0.5 GiB more for NCCL with several GPUs. The caching allocator's
  fragmentation is not included: keep a few percent free.

Checked against real CPU training steps in ``tests/plan/test_plan_vs_measured.py`` (peak RSS
growth; 3 architectures x LoRA/full x checkpointing x 2 sequence lengths, plus bf16 autocast,
bf16-true and a 4-bit base; Qwen3-MoE, Mixtral, DeepSeek-V3, Mamba2 and Nemotron-H): within 5 % of
every measurement, the test's bound is 15 %. Not modelled: expert parallelism (its all-to-all
dispatch buffers and the experts' split over ranks).

``Job`` was renamed ``TrainingJob``; the old name still imports, with a DeprecationWarning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_automodel.contracts import PeftMethod
from nemo_automodel.deprecation import moved_names
from nemo_automodel.errors import bad_value
from nemo_automodel.plan.accounting import COMPONENTS, MemoryEstimate, estimate
from nemo_automodel.plan.job import TrainingJob
from nemo_automodel.plan.recommend import Advice, Change, recommend
from nemo_automodel.plan.report import render
from nemo_automodel.plan.units import GIB, gib, parse_memory

__all__ = ["COMPONENTS", "GIB", "Advice", "Change", "MemoryEstimate", "Plan", "TrainingJob", "estimate", "gib", "plan",
           "plan_memory", "parse_memory"]


__getattr__ = moved_names(__name__, {"Job": "nemo_automodel.plan:TrainingJob"})


@dataclass(frozen=True)
class Plan:
    """An estimate, the memory budget per device it was checked against, and the advice if it does not fit."""

    estimate: MemoryEstimate
    budget: float | None = None
    advice: Advice | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.estimate.total <= self.budget

    def __str__(self) -> str:
        return render(self.estimate, self.budget, self.advice)


def plan(job: TrainingJob, gpu_memory: int | float | str | None = None) -> Plan:
    """Estimate ``job`` and, given the memory per device (bytes, a number of GiB or ``"80GiB"``),
    say whether it fits and what to change if not."""
    est = estimate(job)
    budget = None if gpu_memory is None else parse_memory(gpu_memory)
    advice = recommend(job, budget) if budget is not None and est.total > budget else None
    return Plan(est, budget, advice)


def plan_memory(model: Any, *, gpu_memory: int | float | str | None = None, peft: PeftMethod | str | None = None,
                **job: Any) -> Plan:
    """`plan` from plain arguments: ``model`` (id, folder or config), ``peft`` (a PEFT method, or
    ``"lora"`` for LoRA rank 16 on every projection) and `TrainingJob`'s other fields."""
    if isinstance(peft, str):
        if peft != "lora":
            raise bad_value("peft", peft, "use a PEFT method (e.g. nemo_automodel.peft.LoRA(...)), 'lora' or None")
        from nemo_automodel.peft import LoRA

        peft = LoRA(target_modules=["*_proj"], dim=16, alpha=32)
    return plan(TrainingJob(model, peft=peft, **job), gpu_memory)
