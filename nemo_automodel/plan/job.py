"""`TrainingJob`: what the planner needs to know about a fine-tuning job, as plain values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, cast

import torch

from nemo_automodel.contracts import PeftMethod
from nemo_automodel.errors import ConfigError, bad_value, check_int
from nemo_automodel.models.hf_loading import resolve_dtype
from nemo_automodel.models.quantization import check_trainable, resolve_quantization

PRECISIONS = {"32": "32", "32-true": "32", "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed",
              "bf16-true": "bf16-true"}
STRATEGIES = {None: None, "auto": None, "single": "single", "ddp": "ddp", "fsdp2": "fsdp2", "fsdp": "fsdp2"}
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class TrainingJob:
    """One fine-tuning job, as the planner sees it.

    Args:
        model: Hugging Face model id (read from the local cache only), local model folder, or a
            ``transformers`` config object.
        peft: a PEFT method with ``apply(module)`` (e.g. ``nemo_automodel.peft.LoRA(...)``), or None
            for full fine-tuning.
        precision: the trainer's ``precision``: ``"32"``, ``"bf16-mixed"`` (bf16 autocast over the
            model's weights) or ``"bf16-true"`` (bf16 weights; LoRA adapters and their AdamW state fp32).
        torch_dtype: the model's ``torch_dtype`` (weights' dtype unless ``bf16-true`` overrides it).
        quantization: the model's ``quantization``: None, ``"nf4"``, ``"fp4"`` or a dict of
            ``BitsAndBytesConfig`` 4-bit arguments (QLoRA: 4-bit base linear layers through bitsandbytes).
        strategy: None/``"auto"`` (DDP on several devices, else single), ``"single"``, ``"ddp"``, ``"fsdp2"``.
        devices: processes in all (GPUs per node x nodes); the data-parallel replicas are
            devices / (tensor_parallel x context_parallel).
        micro_batch_size / seq_length: rows per micro-batch and tokens per row (the longest row a
            padded batch can have, or the packed row size).
        packed: rows are packed samples (attention gets a block-diagonal mask).
        activation_checkpointing / chunked_loss: the model's switches.
        accumulate: micro-batches per optimizer step (gradients stay alive across them).
        device: ``"cuda"`` (fused attention kernels, foreach AdamW, a CUDA context) or ``"cpu"``.
        tensor_parallel / context_parallel / tp_plan: ``FSDP2Strategy``'s ``tensor_parallel_size``,
            ``context_parallel_size`` (CUDA, unpacked rows) and ``tp_plan`` (None: the model's own).
        router_aux_loss_coef: the model's ``router_aux_loss_coef`` (mixture-of-experts families: None
            takes the config's, 0 leaves the router load-balancing loss out).
    """

    model: Any
    peft: PeftMethod | None = None
    precision: str = "32"
    torch_dtype: str = "float32"
    quantization: str | dict | None = None
    strategy: str | None = None
    devices: int = 1
    micro_batch_size: int = 1
    seq_length: int = 2048
    packed: bool = False
    activation_checkpointing: bool = False
    chunked_loss: bool = False
    accumulate: int = 1
    device: str = "cuda"
    trust_remote_code: bool = False
    tensor_parallel: int = 1
    context_parallel: int = 1
    tp_plan: dict[str, str] | None = None
    router_aux_loss_coef: float | None = None

    def __post_init__(self) -> None:
        if str(self.precision) not in PRECISIONS:
            raise bad_value("precision", self.precision, f"use one of {sorted(PRECISIONS)}")
        object.__setattr__(self, "precision", PRECISIONS[str(self.precision)])
        resolve_dtype(self.torch_dtype)
        if self.strategy not in STRATEGIES:
            raise bad_value("strategy", self.strategy, "use None, 'auto', 'single', 'ddp' or 'fsdp2'")
        object.__setattr__(self, "strategy", STRATEGIES[self.strategy])
        quantization = resolve_quantization(self.quantization, require_installed=False)
        object.__setattr__(self, "quantization", quantization)
        if self.device not in DEVICES:
            raise bad_value("device", self.device, "use 'cuda' or 'cpu'")
        for field in ("devices", "micro_batch_size", "accumulate", "tensor_parallel", "context_parallel"):
            check_int(field, getattr(self, field))
        check_int("seq_length", self.seq_length, 2)
        self._check_model_parallel()
        if self.strategy == "single" and self.devices > 1:
            raise ConfigError(f"strategy='single' cannot train on {self.devices} devices: use 'ddp' or 'fsdp2'")
        check_trainable(quantization, self.peft, self.effective_strategy)

    def _check_model_parallel(self) -> None:
        tp, cp = self.tensor_parallel, self.context_parallel
        if tp * cp == 1:
            return
        if self.devices % (tp * cp):
            raise ConfigError(f"tensor_parallel={tp} x context_parallel={cp} must divide devices={self.devices}")
        if self.strategy != "fsdp2":
            raise bad_value("strategy", self.strategy, "tensor/context parallel run on strategy='fsdp2'")
        if self.quantization and tp > 1:
            raise ConfigError("tensor_parallel needs nn.Linear layers: a 4-bit (QLoRA) base cannot be sharded")
        if cp > 1 and (self.packed or self.device != "cuda"):
            raise bad_value("context_parallel", cp, "context parallel trains unpacked rows on CUDA only")

    @property
    def data_parallel(self) -> int:
        """The data-parallel replicas: devices / (tensor_parallel x context_parallel)."""
        return self.devices // (self.tensor_parallel * self.context_parallel)

    def replace(self, **changes: Any) -> TrainingJob:
        """A copy with ``changes`` applied (checked again)."""
        return dataclasses.replace(self, **changes)

    @property
    def effective_strategy(self) -> str:
        """What the trainer runs: ``"single"`` on one device, DDP when several and none was chosen."""
        if self.devices == 1:
            return "single"
        return self.strategy or "ddp"

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the weights (a 4-bit base's other weights: embeddings, norms, output layer) are stored in."""
        if self.precision == "bf16-true":
            return torch.bfloat16
        dtype = resolve_dtype(self.torch_dtype)
        return torch.float32 if self.quantization and dtype == torch.float16 else dtype  # peft upcasts fp16

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the layers compute in (autocast's dtype under ``bf16-mixed``)."""
        return torch.bfloat16 if self.precision == "bf16-mixed" else self.weight_dtype

    @property
    def quant_type(self) -> str | None:
        """``"nf4"`` / ``"fp4"`` for a 4-bit base, else None."""
        bnb = self._bnb
        return bnb["bnb_4bit_quant_type"] if bnb else None

    @property
    def quant_bits(self) -> float:
        """Bits per quantized weight, scales included: 4-bit codes + an fp32 absmax per 64 weights (4.5),
        or with double quantization an 8-bit absmax per 64 and an fp32 one per 256 blocks (~4.13)."""
        bnb = self._bnb
        double = bool(bnb and bnb.get("bnb_4bit_use_double_quant"))
        return 4 + 8 / 64 + 32 / (64 * 256) if double else 4 + 32 / 64

    @property
    def quant_compute_dtype(self) -> torch.dtype:
        """The dtype bitsandbytes computes the 4-bit matmuls in (bf16 unless the quantization dict says)."""
        bnb = self._bnb
        return resolve_dtype(bnb["bnb_4bit_compute_dtype"] if bnb else "bfloat16")

    @property
    def _bnb(self) -> dict[str, Any] | None:
        """``quantization`` as ``__post_init__`` resolved it: BitsAndBytesConfig 4-bit arguments, or None."""
        return cast("dict[str, Any] | None", self.quantization)
