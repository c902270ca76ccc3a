"""Parallel strategies over torch.distributed: single device, DDP and FSDP2 (gloo on CPU, nccl on GPU).

A strategy owns the process group, the device and how the model is wrapped; the trainer and
checkpointing call only the ``contracts.Strategy`` methods, and a strategy learns what to shard only from
the ``contracts.TrainableModel`` it wraps. Multi-process runs get RANK, WORLD_SIZE and LOCAL_RANK from
torchrun, NeMo-Run's torchrun launcher, or the trainer's own launcher (``Trainer(devices=N)`` from a plain
``python`` process, see ``trainer/spawn.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from nemo_automodel.contracts import Strategy, TensorParallelPlan, TrainableModel
from nemo_automodel.errors import ConfigError, bad_value, check_int
from nemo_automodel.parallel.mesh import expert_dims, mesh_dims, mesh_shape

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def env_world_size() -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", 1))


class ProcessGroupStrategy:
    """The shared part of every strategy: the launcher's ranks, the device, the process group and
    reductions over all ranks. It trains the model as is; subclasses say how they wrap it."""

    name = "base"
    cpu_bf16_autocast = True  # HF models run under torch.autocast("cpu", bfloat16)

    def __init__(self) -> None:
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.collective_timeout = 600.0
        self.device = torch.device("cpu")

    def setup(self, accelerator: str = "auto", collective_timeout: float = 600.0) -> None:
        """Read the launcher's environment, pick the device and join the process group (its collectives fail
        after ``collective_timeout`` seconds without a peer's answer)."""
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = env_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        if accelerator in ("gpu", "cuda") and not use_cuda:
            raise bad_value("accelerator", accelerator, "CUDA is not available here; use 'cpu' or 'auto'")
        self.device = torch.device("cuda", self.local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.collective_timeout = collective_timeout
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=collective_timeout))

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        """Every rank is a data-parallel replica here (Megatron narrows this to its DP group)."""
        return self.world_size

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def grad_reduce_size(self) -> int:
        """The ranks whose gradients DDP/FSDP average, each holding different tokens of the step: the
        replicas here (FSDP2 with context parallel: replicas x cp ranks)."""
        return self.dp_size

    def micro_batch_context(self, batch: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward, in which ``batch`` holds what this rank
        computes on: the whole batch here (context parallel: this rank's part of every row, in place)."""
        return contextlib.nullcontext(batch)

    def sum_sequence_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (in place) over the ranks that split one micro-batch's rows (context parallel);
        nothing to do here."""
        return tensor

    def wrap(self, model: TrainableModel, mixed_precision: torch.dtype | None = None) -> torch.nn.Module:
        return configured(model)

    def grad_sync(self, module: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's backward; ``sync=False`` skips the gradient all-reduce."""
        return contextlib.nullcontext()

    def all_reduce(self, tensor: torch.Tensor, world: bool = False) -> torch.Tensor:
        """Sum ``tensor`` (in place) over the data-parallel replicas, or over all ranks with ``world``."""
        if self.is_distributed:
            dist.all_reduce(tensor)
        return tensor

    def clip_grad_norm(self, module: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the trainable parameters' gradients to a global norm of ``max_norm``."""
        return torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], max_norm)

    def checkpoint_shard(self) -> tuple[str, Any]:
        """(sub-folder, process group) of this rank's DCP state: one folder for all ranks here."""
        return "", None

    def checkpoint_layout(self) -> dict[str, int]:
        """No model parallelism: DCP reshards the state onto any number of processes."""
        return {}

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class SingleDeviceStrategy(ProcessGroupStrategy):
    """One process, one device."""

    name = "single"

    def setup(self, accelerator: str = "auto", collective_timeout: float = 600.0) -> None:
        if env_world_size() > 1:
            raise ConfigError(f"strategy='single' cannot train on {env_world_size()} processes (each would train "
                              "alone): use strategy='ddp' or 'fsdp2'")
        super().setup(accelerator, collective_timeout)


def configured(model: TrainableModel) -> torch.nn.Module:
    """The module ``model.configure_model`` (and ``apply_peft``) built: what a strategy wraps."""
    if model.model is None:
        raise ConfigError(f"{type(model).__name__}: configure_model() before the strategy wraps it")
    return model.model


def ddp_grad_sync(module: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """``no_sync`` on a DDP-wrapped module for the micro-batches before the last one."""
    from torch.nn.parallel import DistributedDataParallel

    if sync or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (the module itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


class DDPStrategy(ProcessGroupStrategy):
    """Data parallel: every rank holds the full model; DDP averages gradients.

    Gradient accumulation runs the non-final micro-batches under ``no_sync``, so gradients are
    all-reduced once per optimizer step.
    """

    name = "ddp"

    def wrap(self, model: TrainableModel, mixed_precision: torch.dtype | None = None) -> torch.nn.Module:
        module = configured(model)
        if not self.is_distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def grad_sync(self, module: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return ddp_grad_sync(module, sync)


class FSDP2Strategy(ProcessGroupStrategy):
    """Fully sharded data parallel (``fully_shard``) per transformer block and on the root, optionally
    with tensor and context parallel: a device mesh ``("dp", "cp", "tp")`` of shape (D, C, T)
    (``parallel/mesh.py``; dims of size 1 other than dp are left out).

    Applied after LoRA, so only adapters are trainable. ``data_parallel_size`` (D) defaults to the
    world size / (C * T); D * C * T must equal the number of processes. ``mixed_precision`` (from the
    trainer's precision) sets the FSDP param dtype (gradients are reduced in fp32). Gradients are
    reduce-scattered after every micro-batch, which keeps only the sharded gradient in memory during
    accumulation.

    With T > 1, ``wrap`` first shards the model's Linear layers over ``mesh["tp"]`` with its own
    transformers plan (``config.base_model_tp_plan``) or ``tp_plan={pattern: "colwise"|"rowwise"}``
    (``parallel/tensor_parallel.py``; LoRA layers are sharded per part), then applies ``fully_shard`` over
    dp x cp (one flattened ``dp_cp`` mesh, as torchtitan does; skipped when D * C == 1), so gradients are
    reduced over both. ``dp_size``/``dp_rank`` are the dp coordinate: the C * T ranks of one replica read
    the same batches, and ``all_reduce`` sums over the replicas only. Checkpoints hold DTensors that DCP
    reshards, so they resume at any (D, C, T).

    ``context_parallel_size`` C > 1 (CUDA only: PyTorch shards attention only in the CUDA flash /
    memory-efficient / cuDNN SDPA kernels, so it is refused in one line elsewhere) splits every row's
    sequence over the cp ranks in ``micro_batch_context`` (``parallel/context_parallel.py``: padded to a
    multiple of 2 * C, load-balanced, unpacked rows and ``attn_implementation="sdpa"`` only). Each cp rank
    then sums the loss of its tokens, so ``grad_reduce_size`` is D * C and ``sum_sequence_shards`` adds the
    parts. Validation runs the same way.

    ``expert_parallel_size`` E > 1 splits a mixture-of-experts model's routed experts over E ranks
    (``parallel/expert_parallel.py``, transformers' EP): the experts' view of the ranks is ``("efsdp", "ep")``,
    each experts module is FSDP-sharded over efsdp and its tokens are dispatched over ep, while the dense part
    is sharded as above (TP rules on the experts are dropped). E must divide the number of processes and be a
    multiple of T.

    ``reshard_after_forward`` applies to the blocks (and experts); the root module is never resharded after
    forward (FSDP2's own default for it).
    """

    name = "fsdp2"

    def __init__(self, data_parallel_size: int | None = None, reshard_after_forward: bool = True,
                 tensor_parallel_size: int = 1, tp_plan: dict[str, str] | None = None,
                 context_parallel_size: int = 1, expert_parallel_size: int = 1) -> None:
        super().__init__()
        check_int("data_parallel_size", data_parallel_size, allow_none=True)
        check_int("tensor_parallel_size", tensor_parallel_size)
        check_int("context_parallel_size", context_parallel_size)
        check_int("expert_parallel_size", expert_parallel_size)
        if tp_plan is not None and not (isinstance(tp_plan, dict) and all(isinstance(k, str) for k in tp_plan)):
            raise bad_value("tp_plan", tp_plan, "use None or a dict {module pattern: 'colwise'|'rowwise'}")
        self.data_parallel_size = data_parallel_size
        self.reshard_after_forward = reshard_after_forward
        self.tensor_parallel_size = tensor_parallel_size
        self.tp_plan = tp_plan
        self.context_parallel_size = context_parallel_size
        self.expert_parallel_size = expert_parallel_size
        self.mesh: DeviceMesh | None = None
        self.fsdp_mesh: DeviceMesh | None = None
        self.expert_mesh: DeviceMesh | None = None

    def setup(self, accelerator: str = "auto", collective_timeout: float = 600.0) -> None:
        tp, cp = self.tensor_parallel_size, self.context_parallel_size
        if cp > 1 and not (accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()):
            raise bad_value("context_parallel_size", cp, "context parallel needs CUDA GPUs (PyTorch shards attention "
                            "only in the CUDA flash/efficient/cuDNN SDPA kernels); use 1 on CPU")
        dims = mesh_dims(env_world_size(), self.data_parallel_size, cp, tp)
        experts = expert_dims(env_world_size(), self.expert_parallel_size, tp)
        self.data_parallel_size = dims["dp"]
        super().setup(accelerator, collective_timeout)
        from torch.distributed.device_mesh import init_device_mesh

        if tp > 1 or cp > 1:
            shape, names = mesh_shape(dims)
            self.mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=names)
            self.fsdp_mesh = self.mesh["dp", "cp"]._flatten("dp_cp") if cp > 1 else self.mesh["dp"]
        if self.expert_parallel_size > 1:
            self.expert_mesh = init_device_mesh(self.device.type, (experts["efsdp"], experts["ep"]),
                                                mesh_dim_names=("efsdp", "ep"))

    def _batch_sharing_mesh(self) -> DeviceMesh:
        """The ranks that hold the same batch, which expert dispatch splits first: the tp group (a mesh of
        this rank alone without TP)."""
        if self.tensor_parallel_size > 1:
            return self._mesh_dim("tp")
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world_size, 1), mesh_dim_names=("ranks", "tp"))["tp"]

    def _mesh_dim(self, name: str) -> DeviceMesh:
        """One dim of the (dp, cp, tp) mesh ``setup`` built (it exists when tp or cp > 1)."""
        if self.mesh is None:
            raise RuntimeError(f"FSDP2Strategy: no device mesh for {name!r} (setup() builds it when tp or cp > 1)")
        return self.mesh[name]

    @property
    def dp_size(self) -> int:
        return self.data_parallel_size or self.world_size if self.mesh is not None else self.world_size

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else self.rank

    @property
    def grad_reduce_size(self) -> int:
        return self.dp_size * self.context_parallel_size

    def micro_batch_context(self, batch: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
        if self.context_parallel_size == 1:
            return super().micro_batch_context(batch)
        from nemo_automodel.parallel.context_parallel import shard_micro_batch

        return shard_micro_batch(batch, self._mesh_dim("cp"))

    def sum_sequence_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.context_parallel_size > 1:
            dist.all_reduce(tensor, group=self._mesh_dim("cp").get_group())
        return tensor

    def all_reduce(self, tensor: torch.Tensor, world: bool = False) -> torch.Tensor:
        if self.mesh is not None and not world:
            if self.dp_size > 1:
                dist.all_reduce(tensor, group=self._mesh_dim("dp").get_group())
            return tensor
        return super().all_reduce(tensor, world)

    def wrap(self, model: TrainableModel, mixed_precision: torch.dtype | None = None) -> torch.nn.Module:
        """Tensor and expert parallel over the model's plans, then ``fully_shard`` on each experts module (over
        efsdp), each of its repeated blocks and the root."""
        module = configured(model)
        if self.tensor_parallel_size > 1:
            from nemo_automodel.parallel.tensor_parallel import apply_tensor_parallel

            apply_tensor_parallel(self._tensor_parallel_plan(model), self._mesh_dim("tp"), self.tp_plan)
        experts: list[torch.nn.Module] = []
        if self.expert_parallel_size > 1:
            from nemo_automodel.parallel.expert_parallel import apply_expert_parallel

            experts = apply_expert_parallel(model.expert_parallel_plan(), self._expert_mesh()["ep"],
                                            self._batch_sharing_mesh())
        if self.context_parallel_size > 1:
            from nemo_automodel.parallel.context_parallel import check_attention

            check_attention(model.context_parallel_problem(), self.context_parallel_size)
        if not self.is_distributed or self.grad_reduce_size == 1:
            return module
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {"reshard_after_forward": self.reshard_after_forward}
        if mixed_precision is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
        for expert_module in experts:
            efsdp = self._expert_mesh()["efsdp"]
            fully_shard(expert_module, mesh=efsdp, **kwargs)
            # an expert's gradient sums the tokens of every rank in its ep group; dividing by all the data-parallel
            # ranks (not the efsdp ones FSDP would) gives the same mean as the dense part. A factor other than the
            # group size is a PREMUL_SUM that gloo refuses: sum over efsdp, then divide locally.
            expert_module.set_gradient_divide_factor(float(self.grad_reduce_size))  # type: ignore[operator]
            if efsdp.size() > 1:
                expert_module.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
        if self.mesh is not None:
            kwargs["mesh"] = self.fsdp_mesh
        for block in model.repeated_blocks():
            fully_shard(block, **kwargs)
        # The root (embeddings, final norm, output layer) keeps FSDP2's own choice: not resharded after forward,
        # as backward gathers it again at once. Resharding it frees weights that backward reads when the loss does
        # not pass through the root's output, where FSDP2 hooks the re-gather: the chunked loss (a SIGSEGV on CPU).
        fully_shard(module, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"})
        return module

    def _expert_mesh(self) -> DeviceMesh:
        if self.expert_mesh is None:
            raise RuntimeError("FSDP2Strategy: no expert mesh (setup() builds it when expert_parallel_size > 1)")
        return self.expert_mesh

    def _tensor_parallel_plan(self, model: TrainableModel) -> TensorParallelPlan:
        """The model's TP plan, less its rules for the experts when EP splits those."""
        plan = model.tensor_parallel_plan()
        if self.expert_parallel_size == 1 or not plan.styles:
            return plan
        from nemo_automodel.parallel.expert_parallel import tensor_parallel_styles_outside

        return dataclasses.replace(plan, styles=tensor_parallel_styles_outside(plan.styles, model.expert_parallel_plan()))

    def clip_grad_norm(self, module: torch.nn.Module, max_norm: float) -> torch.Tensor:
        if self.mesh is None and self.expert_mesh is None:
            return super().clip_grad_norm(module, max_norm)
        from nemo_automodel.parallel.tensor_parallel import clip_grad_norm

        return clip_grad_norm([p for p in module.parameters() if p.requires_grad], max_norm)

    def checkpoint_layout(self) -> dict[str, int]:
        """Nothing: the state is DTensors (TP and FSDP shards) that DCP reshards onto any (D, C, T)."""
        return {}


STRATEGIES = {"single": SingleDeviceStrategy, "ddp": DDPStrategy, "fsdp2": FSDP2Strategy, "fsdp": FSDP2Strategy}


def resolve_strategy(strategy: Strategy | str | None) -> Strategy:
    """Turn ``None | 'auto' | 'single' | 'ddp' | 'fsdp2'`` or a strategy object into a strategy object.

    Any object with every ``contracts.Strategy`` member is used as is (the Megatron backend's, a user's own).
    ``None``/``'auto'`` is decided where the job runs: DDP on several processes, else single.
    """
    if strategy is not None and not isinstance(strategy, str):
        missing = missing_members(strategy, Strategy)
        if missing:
            raise bad_value("strategy", strategy, f"{type(strategy).__name__} lacks Strategy.{', '.join(missing)}")
        return strategy
    key = strategy.lower() if strategy is not None else "auto"
    if key == "auto":
        return DDPStrategy() if env_world_size() > 1 else SingleDeviceStrategy()
    if key not in STRATEGIES:
        raise bad_value("strategy", strategy, "use None, 'ddp', 'fsdp2' or an FSDP2Strategy(...)")
    return STRATEGIES[key]()


def missing_members(obj: object, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks: a structural check, like ``isinstance`` on a runtime
    Protocol, but without running properties (a strategy's properties may need a process group)."""
    import inspect
    import typing

    members = getattr(typing, "get_protocol_members", None) or typing._get_protocol_attrs  # type: ignore[attr-defined]
    missing = []
    for name in sorted(members(protocol)):
        try:
            inspect.getattr_static(obj, name)
        except AttributeError:
            missing.append(name)
    return missing
