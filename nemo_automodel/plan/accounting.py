"""Peak memory per device of a fine-tuning job (the accounting is described in ``nemo_automodel.plan``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from nemo_automodel.contracts import PeftMethod
from nemo_automodel.errors import ConfigError
from nemo_automodel.models.chunked_ce import lean_head_unsupported
from nemo_automodel.models.hf_loading import load_config
from nemo_automodel.models.router_aux import router_aux_coef
from nemo_automodel.parallel.context_parallel import padded_length
from nemo_automodel.plan.job import TrainingJob
from nemo_automodel.plan.meta_model import (
    ParamInfo,
    build_meta_model,
    parameters_of,
    repeats_identically,
    shard_tensor_parallel,
)
from nemo_automodel.plan.rehearsal import (
    ACTIVATIONS,
    BLOCK_GRADS,
    LOGITS,
    OTHER_GRADS,
    Timeline,
    rehearse_step,
)

WEIGHTS, GRADIENTS, OPTIMIZER, ACTIVATION_ROW, LOGITS_ROW, RUNTIME = COMPONENTS = (
    "weights", "gradients", "optimizer state", "activations", "logits + loss", "CUDA context")
ADAM_STATES = 2  # AdamW: exp_avg and exp_avg_sq, each shaped and typed like its parameter
REHEARSED_LAYERS = 3  # decoder layers rehearsed when all layers repeat identically (the first one differs)
CUDA_CONTEXT = 1 << 30  # CUDA context, cuBLAS/cuDNN workspaces: not in torch's allocations, still on the GPU
NCCL_BUFFERS = 1 << 29  # NCCL communicator buffers with more than one GPU


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory of one device, split into components (bytes, at the moment of the peak).

    ``sizes``: the whole weights, gradients and optimizer state a device holds (at the peak some
    gradients may not exist yet; the optimizer row adds the step's temporaries).
    """

    job: TrainingJob
    architecture: str
    params: int
    trainable: int
    components: dict[str, float]
    phase: str
    sizes: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> float:
        return float(sum(self.components.values()))


@dataclass(frozen=True)
class _Rehearsed:
    timeline: Timeline
    params: list[ParamInfo]  # as one tensor-parallel rank holds them
    counts: tuple[int, int]  # parameters of the whole model: (frozen base, trainable)
    architecture: str
    notes: tuple[str, ...]


_CACHE: dict[tuple, object] = {}


def _cached(key: tuple, make):
    if key not in _CACHE:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = make()
    return _CACHE[key]


def _config_key(config) -> str:
    return config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)


def _peft_key(peft: PeftMethod | None) -> str:
    return "" if peft is None else f"{type(peft).__qualname__}{json.dumps(vars(peft), sort_keys=True, default=str)}"


def state_space(module: torch.nn.Module) -> bool:
    """Whether the model has state-space (Mamba) layers, as ``HFAutoModelForCausalLM`` tells them."""
    return any("mamba" in type(m).__name__.lower() for m in module.modules())


def _rehearsal_dtypes(job: TrainingJob) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype the model computes in during the step, autocast dtype to emulate)."""
    if job.precision != "bf16-mixed" or job.weight_dtype != torch.float32:
        return job.compute_dtype, None
    if job.effective_strategy == "fsdp2":  # FSDP2 gathers the parameters in bf16 (its mixed-precision policy)
        return torch.bfloat16, None
    return torch.float32, torch.bfloat16


def local_seq_length(job: TrainingJob) -> int:
    """Tokens per row on one rank: context parallel pads a row to a multiple of 2 x C and splits it in C."""
    return padded_length(job.seq_length, job.context_parallel) // job.context_parallel if job.context_parallel > 1 \
        else job.seq_length


def _rehearse(job: TrainingJob, config) -> _Rehearsed:
    dtype, autocast = _rehearsal_dtypes(job)
    layers = config.num_hidden_layers
    full = _cached(("model", _config_key(config), dtype),
                   lambda: build_meta_model(config, dtype, trust_remote_code=job.trust_remote_code))
    built = REHEARSED_LAYERS if repeats_identically(full) and layers > REHEARSED_LAYERS + 1 else None
    model = build_meta_model(config, dtype, job.peft, job.activation_checkpointing, layers=built,
                             trust_remote_code=job.trust_remote_code)
    whole = parameters_of(model, total_layers=layers)
    counts = (sum(p.numel for p in whole if not (p.trainable and job.peft is not None)),
              sum(p.numel for p in whole if p.trainable))
    if job.tensor_parallel > 1:
        shard_tensor_parallel(model, job.tensor_parallel, job.tp_plan)
    notes = []
    if state_space(model.module):
        if job.packed:  # HFAutoModelForCausalLM.loss refuses the same
            raise ConfigError(f"{type(full.module).__name__} has state-space (Mamba) layers, which carry their state "
                              "from one packed sample into the next: set the data module's packed_sequence_size=0")
        if job.device == "cuda":
            notes.append("Mamba layers are rehearsed with transformers' PyTorch scan (what runs without mamba-ssm); "
                         "mamba-ssm's fused kernels keep less")
    chunked = job.chunked_loss
    why = lean_head_unsupported(model.module) if chunked else None
    if why:
        notes.append(f"the chunked loss is not used: {why}")
        chunked = False
    timeline = rehearse_step(model.module, model.blocks, micro_batch_size=job.micro_batch_size,
                             seq_length=local_seq_length(job), packed=job.packed, chunked_loss=chunked,
                             kernels=job.device, autocast=autocast,
                             four_bit=job.quant_compute_dtype if job.quantization else None,
                             router_aux=router_aux_coef(config, job.router_aux_loss_coef), total_layers=layers)
    return _Rehearsed(timeline.extended(layers), parameters_of(model, total_layers=layers), counts,
                      type(full.module).__name__, tuple(notes))


def _stored_bytes(p: ParamInfo, job: TrainingJob) -> float:
    """Bytes a parameter occupies: ``job.quant_bits`` when quantized, adapters in their own dtype, the
    rest in the job's weight dtype."""
    if job.quantization and p.quantizable:
        return p.numel * job.quant_bits / 8
    dtype = p.dtype if (p.trainable and job.peft is not None) else job.weight_dtype
    return p.numel * dtype.itemsize


def _step_temporaries(params: list[ParamInfo], stored: np.ndarray, device: str) -> float:
    """AdamW's temporaries during its step: on a GPU (foreach) one list shaped like the trainable
    parameters of a dtype; on a CPU (a loop per parameter) ``sqrt(exp_avg_sq)`` and its quotient
    for the largest one."""
    sizes = [(p.dtype, size) for p, size in zip(params, stored) if p.trainable]
    if device != "cuda":
        return 2 * max((size for _, size in sizes), default=0.0)
    by_dtype: dict[torch.dtype, float] = {}
    for dtype, size in sizes:
        by_dtype[dtype] = by_dtype.get(dtype, 0.0) + size
    return max(by_dtype.values(), default=0.0)


def _fsdp2_gathered(params: list[ParamInfo], compute_size: int) -> float:
    """What FSDP2 holds whole on each rank: the root module (embeddings, output layer, final norm;
    gathered from forward to backward), two decoder layers (the current one and the prefetched next)
    and one layer's fp32 gradients before their reduce-scatter."""
    per_block: dict[int | None, list[ParamInfo]] = {}
    for p in params:
        per_block.setdefault(p.block, []).append(p)
    root = sum(p.numel for p in per_block.pop(None, [])) * compute_size
    block = max((sum(p.numel for p in ps) * compute_size for ps in per_block.values()), default=0)
    block_grads = max((sum(p.numel * 4 for p in ps if p.trainable) for ps in per_block.values()), default=0)
    return float(root + 2 * block + block_grads)


def estimate(job: TrainingJob) -> MemoryEstimate:
    """Predict the peak memory of one device for ``job``: see the accounting in ``nemo_automodel.plan``."""
    config = load_config(job.model, job.trust_remote_code, local_files_only=True, field="model")
    key = ("rehearsal", _config_key(config), _peft_key(job.peft), *_rehearsal_dtypes(job), job.activation_checkpointing,
           job.chunked_loss, job.micro_batch_size, local_seq_length(job), job.packed, job.device,
           job.quantization and job.quant_compute_dtype, job.tensor_parallel, json.dumps(job.tp_plan, sort_keys=True),
           job.router_aux_loss_coef)
    rehearsed: _Rehearsed = _cached(key, lambda: _rehearse(job, config))
    params, timeline = rehearsed.params, rehearsed.timeline

    stored = np.array([_stored_bytes(p, job) for p in params])
    trainable = np.array([p.trainable for p in params])
    weights, grads = float(stored.sum()), float(stored[trainable].sum())
    states = ADAM_STATES * grads
    step_temp = _step_temporaries(params, stored, job.device)

    strategy, n = job.effective_strategy, job.data_parallel * job.context_parallel  # FSDP2 shards over dp x cp
    fsdp2 = strategy == "fsdp2" and n > 1
    shard = 1 / n if fsdp2 else 1.0  # FSDP2 shards weights, gradients and optimizer state
    gathered = _fsdp2_gathered(params, _rehearsal_dtypes(job)[0].itemsize) if fsdp2 else 0.0
    # FSDP2 reduce-scatters a layer's gradients right after its backward, the root's only at the end
    block_share, other_share = (1 / n if fsdp2 else 1.0), 1.0
    buckets = grads if strategy == "ddp" else 0.0  # DDP's gradient buckets: a second copy of the gradients
    runtime = (CUDA_CONTEXT + (NCCL_BUFFERS if job.devices > 1 else 0)) if job.device == "cuda" else 0.0
    kept_grads = 0.0
    if job.accumulate > 1:  # earlier micro-batches' gradients are alive during the later ones
        kept_grads, block_share, other_share = grads * shard, 0.0, 0.0

    row = [float(x) for x in timeline.peak(block_share, other_share)]
    during_step = {WEIGHTS: weights * shard + gathered,
                   GRADIENTS: row[BLOCK_GRADS] + row[OTHER_GRADS] + kept_grads + buckets,
                   OPTIMIZER: states * shard, ACTIVATION_ROW: row[ACTIVATIONS], LOGITS_ROW: row[LOGITS],
                   RUNTIME: runtime}
    during_update = {WEIGHTS: weights * shard, GRADIENTS: grads * shard + buckets,
                     OPTIMIZER: (states + step_temp) * shard, ACTIVATION_ROW: 0.0, LOGITS_ROW: 0.0, RUNTIME: runtime}
    phase, components = max((("forward/backward", during_step), ("optimizer step", during_update)),
                            key=lambda item: sum(item[1].values()))
    if job.device == "cpu":
        components.pop(RUNTIME)
    notes = list(rehearsed.notes)
    if job.precision == "bf16-true" and job.peft is None:
        notes.append("bf16-true full fine-tuning keeps bf16 weights and AdamW state, no fp32 master copy")
    sizes = {WEIGHTS: weights * shard, GRADIENTS: grads * shard, OPTIMIZER: states * shard}
    return MemoryEstimate(job, rehearsed.architecture, *rehearsed.counts, components, phase, sizes, tuple(notes))
