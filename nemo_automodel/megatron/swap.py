"""Backend swap: rewrite a fine-tuning graph from the AutoModel (HF) path to Megatron-Core and back.

    megatron = to_megatron(recipe, tensor_parallel=2)    # model, optimizer, strategy nodes rewritten
    recipe_again = to_automodel(megatron)                # == recipe for our factories' recipes

Both return a new graph and never touch their input. The model keeps its ``model_id`` (weights
are converted from the HF checkpoint where the job runs), the optimizer keeps its learning rate,
schedule, weight decay, betas and eps, and the PEFT, data, log and resume nodes are kept as they
are (``target_modules`` select the equivalent Megatron layers). When the model's config.json is
readable here (a local folder or a cached/online Hub id), an unsupported architecture or a
tensor-parallel size that does not divide it fails now, naming what is missing.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import fiddle as fdl
import nemo_run as run
import torch

from nemo_automodel.errors import ConfigError, check_int
from nemo_automodel.megatron.model import MegatronGPTModel
from nemo_automodel.megatron.optim import (
    BETAS,
    TORCH_OPTIMIZERS,
    TORCH_TO_MEGATRON,
    MegatronOptimizerModule,
    torch_kwargs,
)
from nemo_automodel.megatron.strategy import MegatronStrategy, import_megatron
from nemo_automodel.models import HFAutoModelForCausalLM, HFAutoModelForImageTextToText
from nemo_automodel.peft import DoRA
from nemo_automodel.trainer.optim import PytorchOptimizerModule

log = logging.getLogger(__name__)

SHARED_MODEL_ARGS = ("model_id", "load_pretrained_weights", "tokenizer", "torch_dtype", "revision", "trust_remote_code")


def to_megatron(recipe: run.Partial, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                context_parallel: int = 1, sequence_parallel: bool = False) -> run.Partial:
    """A copy of ``recipe`` on Megatron-Core: GPT model from the same weights, Megatron optimizer, strategy."""
    check_int("tensor_parallel", tensor_parallel)
    _refuse_vlm(getattr(recipe, "model", None))
    new = copy.deepcopy(recipe)
    model = _node(new, "model", HFAutoModelForCausalLM, "an HFAutoModelForCausalLM node")
    new.model = _megatron_model(model, tensor_parallel)
    _check_peft(getattr(new, "peft", None))
    if getattr(new, "optim", None) is not None:
        node = _node(new, "optim", PytorchOptimizerModule, "a PytorchOptimizerModule node (llm.adam.*)")
        new.optim = _megatron_optim(node)
    trainer = _trainer(new)
    _check_devices(trainer, tensor_parallel)
    trainer.strategy = run.Config(MegatronStrategy, tensor_model_parallel_size=tensor_parallel,
                                  pipeline_model_parallel_size=pipeline_parallel,
                                  context_parallel_size=context_parallel, sequence_parallel=sequence_parallel)
    return new


def to_automodel(recipe: run.Partial, strategy: Any = None) -> run.Partial:
    """A copy of a Megatron ``recipe`` on the AutoModel path; ``strategy`` is the trainer's new strategy."""
    new = copy.deepcopy(recipe)
    model = _node(new, "model", MegatronGPTModel, "a MegatronGPTModel node")
    if model.__arguments__.get("model_id") is None:
        raise ConfigError("to_automodel needs the Megatron model node's model_id (a HF id or folder); "
                          "a bare GPTConfig has no HF checkpoint to load")
    new.model = run.Config(HFAutoModelForCausalLM, **_pick(model, SHARED_MODEL_ARGS))
    if getattr(new, "optim", None) is not None:
        new.optim = _automodel_optim(_node(new, "optim", MegatronOptimizerModule, "a MegatronOptimizerModule node"))
    _trainer(new).strategy = strategy
    return new


# -- nodes -------------------------------------------------------------------------------------
def _node(graph: run.Partial, field: str, cls: type, what: str) -> fdl.Buildable:
    node = getattr(graph, field, None)
    if not isinstance(node, fdl.Buildable) or not _is(fdl.get_callable(node), cls):
        raise ConfigError(f"recipe.{field} must be {what} to swap backends, got {_describe(node)}")
    return node


def _is(fn: Any, cls: type) -> bool:
    return isinstance(fn, type) and issubclass(fn, cls)


def _describe(node: Any) -> str:
    if isinstance(node, fdl.Buildable):
        return f"a node of {getattr(fdl.get_callable(node), '__name__', fdl.get_callable(node))}"
    return repr(node)


def _pick(node: fdl.Buildable, names: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in node.__arguments__.items() if k in names}


def _trainer(graph: run.Partial) -> fdl.Buildable:
    trainer = getattr(graph, "trainer", None)
    if not isinstance(trainer, fdl.Buildable):
        raise ConfigError(f"recipe.trainer must be a Trainer node to swap backends, got {_describe(trainer)}")
    return trainer


def _refuse_vlm(model: Any) -> None:
    if isinstance(model, fdl.Buildable) and _is(fdl.get_callable(model), HFAutoModelForImageTextToText):
        raise ConfigError("to_megatron: vision-language models (HFAutoModelForImageTextToText) have no Megatron-Core "
                          "path here (out of scope): keep the recipe on the AutoModel path, e.g. trainer.strategy='fsdp2'")


def _check_peft(peft: Any) -> None:
    if isinstance(peft, fdl.Buildable) and peft.__arguments__.get("use_dora", _is(fdl.get_callable(peft), DoRA)):
        raise ConfigError("to_megatron: use_dora=True (DoRA) has no Megatron-Core implementation here: use plain "
                          "LoRA (use_rslora=True is carried over) to swap backends")


def _check_devices(trainer: fdl.Buildable, tp: int) -> None:
    devices, nodes = trainer.__arguments__.get("devices", 1), trainer.__arguments__.get("num_nodes", 1)
    if isinstance(devices, int) and isinstance(nodes, int) and (devices * nodes) % tp:
        raise ConfigError(f"tensor_parallel={tp} does not divide the trainer's {devices * nodes} devices")


# -- model -------------------------------------------------------------------------------------
def _megatron_model(model: fdl.Buildable, tp: int) -> run.Config:
    args = dict(model.__arguments__)
    if "model_name" in args and "model_id" not in args:
        args["model_id"] = args.pop("model_name")
    if args.get("quantization") is not None:
        raise ConfigError(f"to_megatron: quantization={args['quantization']!r} has no Megatron counterpart (the "
                          "4-bit base is bitsandbytes on the HF path): drop model.quantization to swap backends")
    if args.get("activation_checkpointing"):
        raise ConfigError("to_megatron: activation_checkpointing=True is not carried to Megatron-Core yet (its "
                          "recompute is not wired here): drop model.activation_checkpointing to swap backends")
    dropped = sorted(set(args) - set(SHARED_MODEL_ARGS))
    if dropped:
        log.warning("to_megatron: %s have no Megatron counterpart and are dropped", ", ".join(dropped))
    _check_architecture(args.get("model_id"), tp, args.get("trust_remote_code", False))
    return run.Config(MegatronGPTModel, **{k: v for k, v in args.items() if k in SHARED_MODEL_ARGS})


def _check_architecture(model_id: Any, tp: int, trust_remote_code: bool) -> None:
    """Validate the architecture now when its config.json can be read without downloading weights."""
    from nemo_automodel.megatron.config import gpt_config_from_hf

    if not isinstance(model_id, str):
        log.info("to_megatron: model_id is a graph node; the architecture is checked where the job runs")
        return
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        log.info("to_megatron: config of %r not readable here (%s); checked where the job runs", model_id, err)
        return
    gpt_config_from_hf(hf_config).check_tensor_parallel(tp)


# -- optimizer ---------------------------------------------------------------------------------
def _megatron_optim(optim: fdl.Buildable) -> run.Config:
    fn = optim.__arguments__.get("optimizer_fn")
    target = fdl.get_callable(fn) if isinstance(fn, fdl.Buildable) else None
    if target is torch.optim.AdamW or (target is torch.optim.Adam and not fn.__arguments__.get("weight_decay")):
        kind = "adam"
    elif target is torch.optim.SGD:
        kind = "sgd"
    else:
        raise ConfigError(f"optimizer {_describe(fn)} has no Megatron OptimizerConfig counterpart: use AdamW or SGD")
    args, names = fn.__arguments__, TORCH_TO_MEGATRON[kind]
    fields = {names[k]: v for k, v in args.items() if k in names}
    if "betas" in args:
        fields["adam_beta1"], fields["adam_beta2"] = args["betas"]
    unknown = sorted(set(args) - set(names) - {"betas"})
    if unknown:
        raise ConfigError(f"optimizer arguments {unknown} have no Megatron OptimizerConfig counterpart")
    import_megatron()  # a clear error if the megatron extra is missing
    from megatron.core.optimizer import OptimizerConfig

    # clip_grad=0: clipping stays the trainer's gradient_clip_val, as on the AutoModel path
    config = run.Config(OptimizerConfig, optimizer=kind, clip_grad=0.0, **fields)
    return run.Config(MegatronOptimizerModule, config=config, **_pick(optim, ("lr_scheduler",)))


def _automodel_optim(optim: fdl.Buildable) -> run.Config:
    config = optim.__arguments__["config"]
    args = dict(config.__arguments__)
    kind = args.pop("optimizer", "adam")
    if args.pop("clip_grad", 0.0):
        log.warning("to_automodel: OptimizerConfig.clip_grad is dropped: set trainer.gradient_clip_val")
    dropped = sorted(set(args) - set(TORCH_TO_MEGATRON[kind].values()) - set(BETAS))
    if dropped:
        log.warning("to_automodel: OptimizerConfig fields %s have no AutoModel counterpart and are dropped", dropped)
    fn = run.Partial(TORCH_OPTIMIZERS[kind], **torch_kwargs(kind, args))
    return run.Config(PytorchOptimizerModule, optimizer_fn=fn, **_pick(optim, ("lr_scheduler",)))
