"""The seams between trainer, model, PEFT method, strategy, data and optimizer, as Protocols.

The trainer, the strategies and checkpointing call only what is written here. Each backend (the HF
path in ``models/``, Megatron-Core in ``megatron/``) implements these with its own behaviour; no
caller asks which backend it holds. The implementations conform structurally (they import only the
value types ``TensorParallelPlan`` and ``ExpertParallelPlan``), ``tests/test_layering.py`` checks them member
by member, and mypy checks the callers (``make lint``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


class PeftMethod(Protocol):
    """A LoRA-family adapter recipe: which layers, what rank; applies itself to a HF module."""

    target_modules: list[str]
    exclude_modules: list[str]
    dim: int
    alpha: float
    dropout: float

    def apply(self, module: torch.nn.Module, within: list[str] | None = None) -> torch.nn.Module:
        """Add adapters to a HF module (peft); only the adapters stay trainable. ``within``: module
        prefixes the targets must lie under (None: the whole module)."""


@dataclass(frozen=True)
class TensorParallelPlan:
    """How a model's layers split over a ``tp`` mesh, as the model knows it.

    ``styles``: module pattern (relative to ``root``, ``*`` one name atom) -> ``"colwise"`` | ``"rowwise"``;
    None when the model has no plan of its own. ``divisible``: sizes the TP degree must divide, by name
    (attention heads). ``model``: the model's name and ``source`` where the plan comes from, for one-line errors.
    """

    root: torch.nn.Module
    styles: dict[str, str] | None
    model: str
    source: str
    divisible: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ExpertParallelPlan:
    """How a model's routed experts split over an ``ep`` mesh, as the model knows it.

    ``styles``: module or parameter pattern (relative to ``root``, ``*`` one name atom) -> a transformers
    expert-parallel style (``"ep_dispatch_experts"`` for the experts module, ``"grouped_gemm"`` for its
    stacked weights); None when the model has none (a dense model). ``num_experts``: the routed experts per
    layer, which the EP degree must divide. ``model``/``source`` name the model and the plan's origin, for
    one-line errors.
    """

    root: torch.nn.Module
    styles: dict[str, str] | None
    model: str
    source: str
    num_experts: int | None = None


class TrainableModel(Protocol):
    """The model a trainer trains: lazy until ``configure_model``, then one module it owns.

    It also describes its sharding units to the strategies (``repeated_blocks``, ``tensor_parallel_plan``,
    ``context_parallel_problem``, ``expert_parallel_plan``), read after ``apply_peft``: the generic code never
    guesses them.
    """

    model: torch.nn.Module | None

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer (loaded on first use)."""

    @property
    def is_peft(self) -> bool:
        """True once adapters were added by ``apply_peft``."""

    def configure_model(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
        """Load or build the module on ``device``; idempotent. ``dtype`` overrides the weights' dtype."""

    def check(self, peft: PeftMethod | None, strategy: Strategy) -> None:
        """Refuse, in one line, a combination this model cannot train (e.g. a 4-bit base with no
        ``peft``); called by ``Trainer.fit`` before anything loads."""

    def apply_peft(self, peft: PeftMethod) -> torch.nn.Module:
        """Add ``peft``'s adapters the way this backend can; returns the adapted module."""

    def loss(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed masked cross-entropy of a micro-batch (``module`` is the strategy-wrapped model)."""

    def loss_terms(self) -> dict[str, torch.Tensor]:
        """The auxiliary terms inside ``loss`` since the last call (e.g. a router load-balancing loss), each
        summed like the loss, so divided by the step's loss tokens; without coefficients. The call clears them."""

    def save_hf(self, out: Path, *, module: torch.nn.Module, strategy: Strategy) -> Path:
        """Write ``out/model`` (HF safetensors) or ``out/hf_adapter`` (PEFT) from every rank."""

    def repeated_blocks(self) -> list[torch.nn.Module]:
        """The loaded module's repeated blocks (decoder layers; a VLM's vision blocks too), outermost and in
        order: what FSDP2 shards one by one, activation checkpointing recomputes and JIT compiles."""

    def tensor_parallel_plan(self) -> TensorParallelPlan:
        """How the loaded module splits over tensor-parallel ranks."""

    def context_parallel_problem(self) -> str | None:
        """None when the loaded module's attention can run context parallel; else what it needs, in words."""

    def expert_parallel_plan(self) -> ExpertParallelPlan:
        """How the loaded module's routed experts split over expert-parallel ranks."""


class Strategy(Protocol):
    """Processes, device and model wrapping: single device, DDP, FSDP2 or Megatron TP + DP."""

    name: str  # "single", "ddp", "fsdp2", "megatron"
    cpu_bf16_autocast: bool  # whether its model trains under torch.autocast(bf16) on CPU (precision="auto" asks)
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        """More than one process."""

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas (which data it reads)."""

    @property
    def dp_size(self) -> int:
        """The number of data-parallel replicas."""

    def setup(self, accelerator: str = "auto", collective_timeout: float = 600.0) -> None:
        """Join the launcher's process group and pick the device; a collective that waits longer than
        ``collective_timeout`` seconds for a peer fails instead of hanging."""

    def wrap(self, model: TrainableModel, mixed_precision: torch.dtype | None = None) -> torch.nn.Module:
        """The module to train, from the configured ``model.model``: as is, DDP-wrapped or sharded (over the
        units ``model`` names)."""

    def grad_sync(self, module: torch.nn.Module, sync: bool) -> AbstractContextManager:
        """Context for one micro-batch's backward; ``sync=False`` defers the gradient all-reduce."""

    @property
    def grad_reduce_size(self) -> int:
        """The ranks DDP/FSDP average gradients over (replicas; x context-parallel ranks)."""

    def micro_batch_context(self, batch: dict[str, torch.Tensor]) -> AbstractContextManager:
        """Context for one micro-batch's forward/backward; ``batch`` then holds this rank's part (CP)."""

    def sum_sequence_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that split a micro-batch's rows (context parallel); else as is."""

    def all_reduce(self, tensor: torch.Tensor, world: bool = False) -> torch.Tensor:
        """Sum over the data-parallel replicas, or over every rank with ``world``."""

    def clip_grad_norm(self, module: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the trainable gradients to a global norm; returns the norm before clipping."""

    def checkpoint_shard(self) -> tuple[str, Any]:
        """(sub-folder, process group) of this rank's DCP state."""

    def checkpoint_layout(self) -> dict[str, int]:
        """The model-parallel layout a checkpoint's shards depend on; resume needs the same."""

    def barrier(self) -> None:
        """Wait for every rank."""

    def teardown(self) -> None:
        """Leave the process group."""


class DataModule(Protocol):
    """Batches for one data-parallel rank, with a resumable position."""

    micro_batch_size: int
    accumulate_grad_batches: int | None

    @property
    def has_validation(self) -> bool:
        """A validation split exists."""

    @property
    def micro_batches_per_epoch(self) -> int:
        """Training micro-batches this rank reads per epoch."""

    def setup(self, tokenizer: Any, dp_rank: int = 0, dp_size: int = 1) -> None:
        """Load, format and shard the data (where the job runs)."""

    def train_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless training micro-batches from the current position."""

    def val_batches(self) -> Iterable[dict[str, torch.Tensor]] | None:
        """Validation micro-batches, or None."""

    def state_dict(self) -> dict[str, Any]:
        """The data position."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position."""


class TrainerCallback(Protocol):
    """Hooks a trainer calls; ``trainer.callbacks.Callback`` implements each as a no-op to derive from."""

    def on_train_start(self, trainer: Any, module: torch.nn.Module) -> None:
        """After set-up (adapters added, ``module`` wrapped), before the first step."""

    def on_train_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        """After optimizer step ``step``; ``metrics``: the last logged values."""

    def on_train_end(self, trainer: Any) -> None:
        """After the last step and checkpoint."""


class OptimizerModule(Protocol):
    """An optimizer and LR schedule, built once the trainable parameters exist."""

    clip_grad: float | None

    def check(self, max_steps: int) -> None:
        """Refuse a schedule that does not fit a run of ``max_steps`` (called before anything loads)."""

    def build(self, params: Iterable[torch.nn.Parameter], max_steps: int) -> tuple[torch.optim.Optimizer, Any]:
        """``(optimizer, scheduler)`` over ``params``."""
