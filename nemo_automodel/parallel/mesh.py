"""The device mesh of ``FSDP2Strategy`` as plain arithmetic: its dims, each rank's coordinates, and the
layout over nodes in words (for the launch dryrun). Nothing here touches torch.distributed.

Dims run outermost first, ``("dp", "cp", "tp")``, the order of ``init_device_mesh``'s row-major layout:
rank = (dp_i * cp + cp_i) * tp + tp_i. So the T ranks of a tp group are consecutive (one node when T
divides the GPUs per node), a cp group's ranks are T apart, and dp is outermost (across nodes). Expert
parallel lays the routed experts over the same ranks as ``("efsdp", "ep")``: an ep group is E consecutive ranks.
"""

from __future__ import annotations

import math

from nemo_automodel.errors import ConfigError, bad_value

DIM_ORDER = ("dp", "cp", "tp")


def mesh_dims(world: int, data_parallel_size: int | None = None, context_parallel_size: int = 1,
              tensor_parallel_size: int = 1) -> dict[str, int]:
    """``{"dp": D, "cp": C, "tp": T}`` for ``world`` processes (D defaults to world / (C * T));
    one-line ConfigError when the sizes do not multiply to ``world``."""
    cp, tp = context_parallel_size, tensor_parallel_size
    inner = cp * tp
    if data_parallel_size is None:
        if world % inner:
            if cp == 1:
                raise bad_value("tensor_parallel_size", tp, f"must divide the number of processes ({world})")
            raise bad_value("context_parallel_size", cp, f"context_parallel_size x tensor_parallel_size = {inner} "
                            f"must divide the number of processes ({world})")
        data_parallel_size = world // inner
    dims = {"dp": data_parallel_size, "cp": cp, "tp": tp}
    if math.prod(dims.values()) != world:
        factors = " x ".join(f"{_FIELDS[k]}={v}" for k, v in dims.items() if k != "cp" or cp > 1)
        raise ConfigError(f"{factors} = {math.prod(dims.values())} must equal the number of processes ({world})")
    return dims


_FIELDS = {"dp": "data_parallel_size", "cp": "context_parallel_size", "tp": "tensor_parallel_size"}


def expert_dims(world: int, expert_parallel_size: int, tensor_parallel_size: int = 1) -> dict[str, int]:
    """The experts' view of the same ranks, ``{"efsdp": world / E, "ep": E}`` (transformers' layout): an ep
    group is E consecutive ranks that hold distinct experts (whole tp groups, so E must be a multiple of T), and
    the efsdp ranks hold the same experts, FSDP-sharded. One-line ConfigError when the sizes do not fit."""
    ep, tp = expert_parallel_size, tensor_parallel_size
    if ep == 1:  # no expert parallel: every rank holds every expert (whatever TP does to the dense part)
        return {"efsdp": world, "ep": 1}
    if world % ep:
        raise bad_value("expert_parallel_size", ep, f"must divide the number of processes ({world})")
    if ep % tp:
        raise bad_value("expert_parallel_size", ep, f"must be a multiple of tensor_parallel_size ({tp}): an "
                        "expert group holds whole tensor-parallel groups")
    return {"efsdp": world // ep, "ep": ep}


def mesh_shape(dims: dict[str, int]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(shape, names) for ``init_device_mesh``: dp always, cp and tp when larger than 1."""
    kept = [k for k in DIM_ORDER if k == "dp" or dims[k] > 1]
    return tuple(dims[k] for k in kept), tuple(kept)


def coordinates(rank: int, dims: dict[str, int]) -> dict[str, int]:
    """This rank's index along each dim (row-major, dp outermost)."""
    out = {}
    for name in reversed(DIM_ORDER):
        rank, out[name] = divmod(rank, dims[name])
    return {k: out[k] for k in DIM_ORDER}


def describe_mesh(dims: dict[str, int], ranks_per_node: int | None = None, expert_parallel_size: int = 1) -> str:
    """``"mesh (dp=2, tp=8) over 16 ranks on 2 nodes x 8: tp groups within a node, dp across nodes"``, and
    with expert parallel the experts' view: ``"; experts (efsdp=2, ep=8): ep groups within a node"``."""
    text = _describe_dense(dims, ranks_per_node)
    if expert_parallel_size == 1:
        return text
    world = math.prod(dims.values())
    experts = expert_dims(world, expert_parallel_size, dims["tp"])
    text += f"; experts (efsdp={experts['efsdp']}, ep={experts['ep']})"
    if ranks_per_node and world > ranks_per_node:
        inside = ranks_per_node % expert_parallel_size == 0
        text += f": ep groups {'within a node' if inside else 'across nodes'}"
    return text


def _describe_dense(dims: dict[str, int], ranks_per_node: int | None) -> str:
    world = math.prod(dims.values())
    shown = ", ".join(f"{k}={dims[k]}" for k in DIM_ORDER if k == "dp" or dims[k] > 1)
    text = f"mesh ({shown}) over {world} ranks"
    if not ranks_per_node or world <= 1:
        return text
    nodes = math.ceil(world / ranks_per_node)
    text += f" on {nodes} node{'s' * (nodes > 1)} x {ranks_per_node}"
    where, span = [], 1
    for name in reversed(DIM_ORDER):  # innermost first: a group spans `span` consecutive ranks
        span *= dims[name]
        if dims[name] > 1:
            inside = nodes == 1 or ranks_per_node % span == 0
            where.append(f"{name} groups {'within a node' if inside else 'across nodes'}")
    return text + (": " + ", ".join(where) if where else "")
