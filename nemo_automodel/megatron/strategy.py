"""`MegatronStrategy`: Megatron-Core tensor parallelism plus data parallelism over the rest.

The process group is torch.distributed's (gloo on CPU, nccl on GPU); ``setup`` then builds
Megatron's model-parallel groups. Ranks of one tensor-parallel group see the same data; data
parallelism (``ddp='pytorch'``: torch DDP on Megatron's data-parallel group) runs over the
groups. Pipeline and context parallelism and sequence parallelism need Megatron's own schedules,
which this trainer does not drive yet: asking for them fails at set-up with one line.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist

from nemo_automodel.contracts import TrainableModel
from nemo_automodel.errors import ConfigError, bad_value, check_int
from nemo_automodel.parallel.strategy import ProcessGroupStrategy, configured, ddp_grad_sync


def import_megatron():
    """Import ``megatron.core`` (quietly: it warns about optional CUDA extensions) or explain the extra."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import megatron.core  # noqa: F401
            from megatron.core import parallel_state, tensor_parallel
    except ImportError as err:
        raise ConfigError("the Megatron-Core backend needs megatron-core: pip install --no-deps "
                          "'megatron-core==0.16.1' (the project's 'megatron' extra)") from err
    return parallel_state, tensor_parallel


class MegatronStrategy(ProcessGroupStrategy):
    """Megatron-Core model parallelism (NeMo's ``nl.MegatronStrategy`` arguments).

    Args:
        tensor_model_parallel_size: ranks that split each layer (heads, MLP, vocabulary).
        pipeline_model_parallel_size, context_parallel_size, sequence_parallel: accepted for
            NeMo compatibility; values other than 1/1/False are refused at set-up.
        ddp: ``'pytorch'`` (torch DDP over Megatron's data-parallel group).
    """

    name = "megatron"
    # Megatron-Core's layers on the CPU shim mix autocast's bf16 with their fp32 weights ("expected m1 and m2 to
    # have the same dtype"): precision="auto" keeps fp32 there
    cpu_bf16_autocast = False

    def __init__(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                 context_parallel_size: int = 1, sequence_parallel: bool = False, ddp: str = "pytorch") -> None:
        super().__init__()
        for field, value in (("tensor_model_parallel_size", tensor_model_parallel_size),
                             ("pipeline_model_parallel_size", pipeline_model_parallel_size),
                             ("context_parallel_size", context_parallel_size)):
            check_int(field, value)
        if ddp != "pytorch":
            raise bad_value("ddp", ddp, "use 'pytorch' (Megatron's own DDP and distributed optimizer need its "
                                        "training schedule, which this trainer does not drive)")
        self.tensor_model_parallel_size = tensor_model_parallel_size
        self.pipeline_model_parallel_size = pipeline_model_parallel_size
        self.context_parallel_size = context_parallel_size
        self.sequence_parallel = sequence_parallel
        self.ddp = ddp
        self.dp_group = None  # Megatron's data-parallel group, once set up

    def setup(self, accelerator: str = "auto", collective_timeout: float = 600.0) -> None:
        super().setup(accelerator, collective_timeout)
        unsupported = {k: v for k, v in (("pipeline_model_parallel_size", self.pipeline_model_parallel_size),
                                         ("context_parallel_size", self.context_parallel_size),
                                         ("sequence_parallel", self.sequence_parallel)) if v not in (1, False)}
        if unsupported:
            raise ConfigError(f"MegatronStrategy({unsupported}) is not supported by this trainer yet: "
                              "use tensor_model_parallel_size with data parallelism")
        tp = self.tensor_model_parallel_size
        if self.world_size % tp:
            raise ConfigError(f"tensor_model_parallel_size={tp} does not divide the {self.world_size} processes")
        parallel_state, tensor_parallel = import_megatron()
        from nemo_automodel.megatron import cpu_shim

        cpu_shim.apply()
        if not dist.is_initialized():  # one process: Megatron still needs a (single-rank) process group
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        tensor_parallel.model_parallel_cuda_manual_seed(torch.initial_seed(), force_reset_rng=True)
        self.dp_group = parallel_state.get_data_parallel_group()

    # -- data parallelism over Megatron's data-parallel group ------------------------------
    @property
    def dp_size(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_world_size()

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()

    def wrap(self, model: TrainableModel, mixed_precision: torch.dtype | None = None) -> torch.nn.Module:
        module = configured(model)
        if self.dp_size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, process_group=self.dp_group)

    def grad_sync(self, module: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return ddp_grad_sync(module, sync)

    def all_reduce(self, tensor: torch.Tensor, world: bool = False) -> torch.Tensor:
        """Sum over Megatron's data-parallel group (tensor-parallel ranks hold the same batch), or all ranks."""
        if self.is_distributed:
            dist.all_reduce(tensor, group=None if world else self.dp_group)
        return tensor

    def clip_grad_norm(self, module: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip by the global norm: TP-split parameters count once per shard, replicated ones once."""
        from megatron.core import parallel_state

        grads = [(p, g) for p in module.parameters() if p.requires_grad and (g := p.grad) is not None]
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p, g in grads:
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                sq += g.detach().double().pow(2).sum()
        if self.tensor_model_parallel_size > 1:
            dist.all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for _, g in grads:
            g.mul_(coef.to(g.dtype))
        return norm

    def checkpoint_shard(self) -> tuple[str, object]:
        """Each TP rank saves its slices in its own DCP folder, with its data-parallel replicas."""
        from megatron.core import parallel_state

        if self.tensor_model_parallel_size == 1:
            return "", None
        return f"tp{parallel_state.get_tensor_model_parallel_rank():02d}", self.dp_group

    def checkpoint_layout(self) -> dict[str, int]:
        """Each TP rank's DCP folder holds its slices: resuming needs the same tensor-parallel size."""
        return {"tensor_parallel": self.tensor_model_parallel_size}

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        super().teardown()
