"""The device mesh of ``FSDP2Strategy`` as plain arithmetic: its dims, each rank's coordinates, and the
layout over nodes in words (for the launch dryrun). Nothing here touches torch.distributed.

Dims run outermost first, ``("dp", "cp", "tp")``, the order of ``init_device_mesh``'s row-major layout:
rank = (dp_i * cp + cp_i) * tp + tp_i. So the T ranks of a tp group are consecutive (one node when T
divides the GPUs per node), a cp group's ranks are T apart, and dp is outermost (across nodes).
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


def describe_mesh(dims: dict[str, int], ranks_per_node: int | None = None) -> str:
    """``"mesh (dp=2, tp=8) over 16 ranks on 2 nodes x 8: tp groups within a node, dp across nodes"``."""
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
