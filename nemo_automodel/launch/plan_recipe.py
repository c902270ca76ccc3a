"""The memory planner on a recipe graph: the one place where the planner reads Fiddle nodes.

``job_from_recipe`` turns a ``run.Partial(finetune | pretrain, model=…, peft=…, data=…, trainer=…)``
into a `nemo_automodel.plan.TrainingJob` (plain values); ``plan_recipe`` plans it.
"""

from __future__ import annotations

from typing import Any

import fiddle as fdl

from nemo_automodel.errors import ConfigError
from nemo_automodel.models import HFAutoModelForCausalLM
from nemo_automodel.plan import Plan, TrainingJob, plan
from nemo_automodel.plan.fit import AUTO as FIT_AUTO
from nemo_automodel.plan.fit import fit_job, free_memory, parse_fit_memory
from nemo_automodel.trainer.precision import AUTO, planned_precision

_STRATEGY_NAMES = {"SingleDeviceStrategy": "single", "DDPStrategy": "ddp", "FSDP2Strategy": "fsdp2"}


def _arg(node: Any, name: str, default: Any = None) -> Any:
    """An argument of a graph node (its signature default when unset; ``default`` when it has none)."""
    try:
        return getattr(node, name)
    except AttributeError:
        return default


def _model_id(model: fdl.Buildable, build_nodes: bool) -> Any:
    model_id = _arg(model, "model_id") or _arg(model, "model_name")
    if isinstance(model_id, fdl.Buildable):
        fn = getattr(fdl.get_callable(model_id), "__name__", "a node")
        if not build_nodes:
            raise ConfigError(f"model_id comes from a graph node ({fn}) that is built only when the job runs; "
                              "`nemo automodel plan <recipe>` builds it, or plan its folder directly")
        return fdl.build(model_id)
    return model_id


def _strategy(trainer: fdl.Buildable) -> str | None:
    strategy = _arg(trainer, "strategy")
    if strategy is None or isinstance(strategy, str):
        return strategy
    cls = fdl.get_callable(strategy) if isinstance(strategy, fdl.Buildable) else type(strategy)
    name = getattr(cls, "__name__", str(cls))
    if name not in _STRATEGY_NAMES:
        raise ConfigError(f"trainer.strategy={name}: the memory plan covers single, DDP and FSDP2 (the Megatron "
                          "path is not estimated)")
    return _STRATEGY_NAMES[name]


def strategy_sizes(trainer: fdl.Buildable) -> dict[str, Any]:
    """``FSDP2Strategy``'s tensor/context-parallel sizes and TP plan as `TrainingJob` fields (1/1/None for any other)."""
    strategy = _arg(trainer, "strategy")
    if strategy is None or isinstance(strategy, str):
        return {"tensor_parallel": 1, "context_parallel": 1, "tp_plan": None}
    return {"tensor_parallel": int(_arg(strategy, "tensor_parallel_size", 1)),
            "context_parallel": int(_arg(strategy, "context_parallel_size", 1)),
            "tp_plan": _arg(strategy, "tp_plan")}


def job_from_recipe(recipe: fdl.Buildable, *, gpus: int | None = None, seq: int | None = None,
                    device: str | None = None, build_nodes: bool = True) -> TrainingJob:
    """The `TrainingJob` a recipe graph describes; ``gpus``/``seq``/``device`` override what it says. ``gpus`` are
    all processes: the data-parallel replicas are gpus / (tensor x context parallel sizes of the strategy).

    ``build_nodes``: a ``model_id`` given as a graph node (e.g. the demo's model folder) is built
    to learn the folder; False refuses instead (the dryrun stays fast).
    """
    model, trainer, data = (_arg(recipe, k) for k in ("model", "trainer", "data"))
    if not isinstance(model, fdl.Buildable) or fdl.get_callable(model) is not HFAutoModelForCausalLM:
        name = getattr(fdl.get_callable(model), "__name__", type(model).__name__) if model is not None else "None"
        raise ConfigError(f"model={name}: the memory plan covers HFAutoModelForCausalLM (the Megatron path is not "
                          "estimated)")
    peft = _arg(recipe, "peft")
    packed = int(_arg(data, "packed_sequence_size", 0) or 0)
    micro = int(_arg(data, "micro_batch_size", 1))
    devices = gpus or int(_arg(trainer, "devices", 1)) * int(_arg(trainer, "num_nodes", 1))
    sizes = strategy_sizes(trainer)
    strategy_node = _arg(trainer, "strategy")
    experts = int(_arg(strategy_node, "expert_parallel_size", 1)) if isinstance(strategy_node, fdl.Buildable) else 1
    if experts > 1:
        raise ConfigError(f"expert_parallel_size={experts} is not modelled (the planner sizes experts sharded by "
                          "FSDP2 alone, not the all-to-all dispatch)")
    replicas = max(1, devices // (sizes["tensor_parallel"] * sizes["context_parallel"]))
    global_batch = _arg(data, "global_batch_size")
    accumulate = (max(1, global_batch // (micro * replicas)) if global_batch else
                  int(_arg(trainer, "accumulate_grad_batches", 1)))
    chunked = _arg(model, "chunked_loss", False) or _arg(model, "use_liger_kernel", False)
    device = device or ("cpu" if _arg(trainer, "accelerator", "auto") == "cpu" else "cuda")
    precision = str(_arg(trainer, "precision", AUTO))
    if precision == AUTO:  # what the trainer will choose there (a planned GPU: one with bf16)
        precision, _ = planned_precision(device, peft is not None)
    return TrainingJob(
        model=_model_id(model, build_nodes),
        peft=fdl.build(peft) if isinstance(peft, fdl.Buildable) else peft,
        precision=precision,
        torch_dtype=str(_arg(model, "torch_dtype", "float32")),
        quantization=_arg(model, "quantization"),
        strategy=_strategy(trainer),
        devices=devices,
        micro_batch_size=micro,
        seq_length=seq or packed or int(_arg(data, "seq_length", 2048)),
        packed=bool(packed),
        activation_checkpointing=bool(_arg(model, "activation_checkpointing", False)),
        chunked_loss=bool(chunked),
        accumulate=accumulate,
        device=device,
        trust_remote_code=bool(_arg(model, "trust_remote_code", False)),
        router_aux_loss_coef=_arg(model, "router_aux_loss_coef"),
        **sizes,
    )


def plan_recipe(recipe: fdl.Buildable, *, gpus: int | None = None, gpu_memory: int | float | str | None = None,
                seq: int | None = None, device: str | None = None, build_nodes: bool = True) -> Plan:
    """Plan the memory of a recipe (``run.Partial(finetune, …)``) on ``gpus`` devices of ``gpu_memory`` each."""
    return plan(job_from_recipe(recipe, gpus=gpus, seq=seq, device=device, build_nodes=build_nodes), gpu_memory)


def recipe_fit_memory(recipe: fdl.Buildable) -> int | str | None:
    """The recipe's ``trainer.fit_memory`` (bytes, ``"auto"`` or None); a one-line ConfigError when it is not a budget."""
    return parse_fit_memory(_arg(_arg(recipe, "trainer"), "fit_memory"))


def fit_recipe(recipe: fdl.Buildable, *, gpus: int | None = None, seq: int | None = None, device: str | None = None,
               build_nodes: bool = True) -> list[str]:
    """What the recipe's ``trainer.fit_memory`` would change (``plan/fit.py``), as the trainer prints it; no lines
    when it is unset, one when the budget is ``"auto"`` on a GPU (read where the job runs), a ConfigError when
    nothing it may change fits."""
    trainer = _arg(recipe, "trainer")
    fit_memory = recipe_fit_memory(recipe)
    if fit_memory is None:
        return []
    job = job_from_recipe(recipe, gpus=gpus, seq=seq, device=device, build_nodes=build_nodes)
    source = ""
    if fit_memory == FIT_AUTO:
        if job.device == "cuda":
            return ["fit_memory: budget 'auto', the free memory of each GPU where the job runs: the changes are "
                    "decided there (a size, e.g. trainer.fit_memory=80GiB, shows them here)"]
        import torch

        fit_memory, source = free_memory(torch.device("cpu"), processes=min(job.devices, int(_arg(trainer, "devices", 1))))
        source = f"this machine's {source}"
    precision_auto = str(_arg(trainer, "precision", AUTO)) == AUTO and job.precision != "32"
    strategy_auto = _arg(trainer, "strategy") in (None, "auto")
    fitting = fit_job(job, int(fit_memory), precision_adjustable=precision_auto, strategy_adjustable=strategy_auto)
    return fitting.lines(source, dry=True)
