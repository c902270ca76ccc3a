"""`MegatronGPTModel`: a Megatron-Core ``GPTModel`` built from a HF model id, weights converted on load.

Nothing is read until `configure_model` (which runs where the job runs, after
`MegatronStrategy.setup`): the HF config gives the architecture (`gpt_config_from_hf`), the HF
weights are read tensor by tensor from the checkpoint's safetensors (transformers loads the
checkpoints that have none), converted (`convert.iter_hf_to_megatron`) and each rank keeps its
tensor-parallel slices. `save_hf` writes the trained model back as a HF folder or a PEFT
adapter that transformers/peft/vLLM load.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from nemo_automodel.contracts import ExpertParallelPlan, PeftMethod, Strategy, TensorParallelPlan
from nemo_automodel.errors import ConfigError, bad_value, first_line
from nemo_automodel.megatron import convert
from nemo_automodel.megatron.config import GPTConfig, gpt_config_from_hf
from nemo_automodel.megatron.hf_checkpoint import SafetensorsCheckpoint, checkpoint_folder
from nemo_automodel.megatron.lora import apply_megatron_lora, refuse_dora
from nemo_automodel.megatron.strategy import import_megatron
from nemo_automodel.models.hf_loading import resolve_dtype
from nemo_automodel.models.hf_save import INDEX_FILE
from nemo_automodel.models.tokenizer import load_tokenizer
from nemo_automodel.parallel.strategy import unwrap

log = logging.getLogger(__name__)


class MegatronGPTModel:
    """A Llama/Mistral/Qwen2-family model on Megatron-Core, from ``model_id`` and/or a `GPTConfig`.

    Args:
        model_id: Hub id or local folder of the HF checkpoint (architecture, weights, tokenizer).
        config: architecture; default: derived from ``model_id``'s config.json.
        load_pretrained_weights: False builds Megatron's random initialisation.
        tokenizer: tokenizer id/folder if it differs from ``model_id``.
        torch_dtype: parameter dtype. revision, trust_remote_code: as for transformers.
    """

    def __init__(self, model_id: str | os.PathLike | None = None, config: GPTConfig | None = None,
                 load_pretrained_weights: bool = True, tokenizer: str | None = None,
                 torch_dtype: str | torch.dtype = "float32", revision: str | None = None,
                 trust_remote_code: bool = False) -> None:
        if isinstance(model_id, os.PathLike):
            model_id = str(model_id)
        if model_id is None and config is None:
            raise bad_value("model_id", None, "pass a HF model id/folder, a GPTConfig, or both")
        if model_id is None and load_pretrained_weights:
            load_pretrained_weights = False  # a bare architecture (NeMo's LlamaModel(config)) starts random
        self.model_id, self.config = model_id, config
        self.load_pretrained_weights = load_pretrained_weights
        self.tokenizer_id = tokenizer or model_id
        self.dtype = resolve_dtype(torch_dtype)
        self.revision, self.trust_remote_code = revision, trust_remote_code
        self.model: torch.nn.Module | None = None
        self.is_peft = False
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_id is None:
                raise ConfigError("MegatronGPTModel(config=...) without model_id needs tokenizer=<id or folder>")
            self._tokenizer = load_tokenizer(self.tokenizer_id, trust_remote_code=self.trust_remote_code,
                                             revision=self.revision)
        return self._tokenizer

    # -- building --------------------------------------------------------------------------
    def _hf_config(self):
        import transformers

        try:
            return transformers.AutoConfig.from_pretrained(self.model_id, revision=self.revision,
                                                           trust_remote_code=self.trust_remote_code)
        except OSError as err:
            raise ConfigError(f"model_id={self.model_id!r} has no readable config.json: {err}") from err

    def configure_model(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
        """Build this rank's slice of the model on ``device`` (needs `MegatronStrategy.setup` first);
        ``dtype`` overrides ``torch_dtype`` (Megatron's ``params_dtype``)."""
        if self.model is not None:
            return self.model
        self.dtype = dtype or self.dtype
        parallel_state, _ = import_megatron()
        if not parallel_state.model_parallel_is_initialized():
            raise ConfigError("MegatronGPTModel needs trainer strategy=MegatronStrategy(...) "
                              "(use nemo_automodel.megatron.swap.to_megatron on an AutoModel recipe)")
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        if self.config is None:
            self.config = gpt_config_from_hf(self._hf_config())
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.config.check_tensor_parallel(tp)
        # pretrained weights overwrite every parameter (checked): skip Megatron's random init, which on the CPU
        # builds each full weight and copies this rank's slice out of it
        tcfg = self.config.transformer_config(tensor_model_parallel_size=tp, params_dtype=self.dtype,
                                              bf16=self.dtype == torch.bfloat16, fp16=self.dtype == torch.float16,
                                              perform_initialization=not self.load_pretrained_weights)
        model = GPTModel(config=tcfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                         **self.config.gpt_model_kwargs())
        if self.load_pretrained_weights:
            load_hf_weights(model, self._hf_tensors(), self.config, tp, parallel_state.get_tensor_model_parallel_rank())
        tcfg.perform_initialization = True  # layers added later (LoRA) share this config and need their init
        self.model = model.to(device)
        return self.model

    def _hf_tensors(self) -> Mapping[str, torch.Tensor]:
        """The HF checkpoint's tensors by name: read lazily from safetensors, else via transformers."""
        if self.model_id is None:  # __init__ turns load_pretrained_weights off without a model_id
            raise ConfigError("MegatronGPTModel(load_pretrained_weights=True) needs model_id=<HF id or folder>")
        try:
            folder = checkpoint_folder(self.model_id, self.revision)
        except Exception as err:  # noqa: BLE001 (hub/network errors: transformers reports them better)
            log.warning("reading %s's safetensors directly failed (%s); loading it with transformers",
                        self.model_id, first_line(err))
            folder = None
        if folder is not None:
            return SafetensorsCheckpoint(folder)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(self.model_id, dtype=self.dtype, revision=self.revision,
                                                  trust_remote_code=self.trust_remote_code)
        return hf.state_dict()

    def check(self, peft: PeftMethod | None, strategy: Strategy) -> None:
        """Refuse DoRA before loading; the Megatron path has no quantized base (``to_megatron`` refuses
        one) and trains LoRA or all weights on its own strategy."""
        if peft is not None:
            refuse_dora(peft)

    def apply_peft(self, peft: PeftMethod) -> torch.nn.Module:
        """LoRA on Megatron's fused parallel linears, selected by the same ``target_modules`` as on HF."""
        if self.model is None:
            raise ConfigError("MegatronGPTModel.apply_peft needs configure_model() first")
        self.model = apply_megatron_lora(self.model, peft)
        self.is_peft = True
        return self.model

    # -- sharding units (contracts.TrainableModel) -------------------------------------------
    def _built(self) -> tuple[torch.nn.Module, GPTConfig]:
        """The model and the config it was built from (``configure_model`` sets both)."""
        if self.model is None or self.config is None:
            raise ConfigError("MegatronGPTModel: configure_model() first (the model is not built)")
        return self.model, self.config

    def _loaded(self) -> torch.nn.Module:
        return self._built()[0]

    def repeated_blocks(self) -> list[torch.nn.Module]:
        """GPTModel's transformer layers (``decoder.layers``, a ModuleList)."""
        return list(cast(torch.nn.ModuleList, unwrap(self._loaded()).get_submodule("decoder.layers")))

    def tensor_parallel_plan(self) -> TensorParallelPlan:
        """None to apply: Megatron-Core's parallel layers split themselves under ``MegatronStrategy``."""
        return TensorParallelPlan(root=self._loaded(), styles=None, model="MegatronGPTModel",
                                  source="its layers are Megatron-Core's own parallel layers: use "
                                         "MegatronStrategy(tensor_model_parallel_size=...)")

    def context_parallel_problem(self) -> str | None:
        return "an HF model: MegatronStrategy trains MegatronGPTModel, and runs no context parallel here"

    def expert_parallel_plan(self) -> ExpertParallelPlan:
        """None: the Megatron path converts dense GPT models only, which have no routed experts."""
        return ExpertParallelPlan(root=self._loaded(), styles=None, model="MegatronGPTModel",
                                  source="the Megatron path converts dense GPT models only (no routed experts)")

    # -- training --------------------------------------------------------------------------
    def _inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """GPTModel's ``(input_ids, position_ids, attention_mask)``; the boolean ``[B, 1, T, T]`` mask
        (True = masked) is causal, within each packed sample (position ids restart at 0), and within
        Mistral's sliding window when it has one."""
        ids = batch["input_ids"]
        t = torch.arange(ids.shape[1], device=ids.device)
        pos = batch.get("position_ids")
        pos = t.expand_as(ids) if pos is None else pos
        segment = (pos == 0).cumsum(dim=1)
        allowed = (segment[:, :, None] == segment[:, None, :]) & (t[None, :, None] >= t[None, None, :])
        window = self.config.sliding_window if self.config else None
        if window:
            allowed &= (t[None, :, None] - t[None, None, :]) < window
        return ids, pos, ~allowed[:, None]

    def loss(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed masked cross-entropy (Megatron's vocab-parallel CE, so TP never gathers logits)."""
        per_token = module(*self._inputs(batch), labels=batch["labels"])
        return (per_token.float() * batch["loss_mask"].to(torch.float32)).sum()

    def loss_terms(self) -> dict[str, torch.Tensor]:
        """None: the loss is the cross-entropy alone."""
        return {}

    def logits(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full-vocabulary logits ``[B, T, V]`` (gathered over tensor-parallel ranks; no gradient)."""
        return torch.cat(_tp_parts(module(*self._inputs(batch)).detach()), dim=-1)

    # -- export ----------------------------------------------------------------------------
    def full_state_dict(self, module: torch.nn.Module | None = None, lora_only: bool = False) -> dict[str, torch.Tensor]:
        """Every Megatron parameter (or only the LoRA ones), gathered over the tensor-parallel group,
        by its Megatron name (adapted layers' ``.base_layer`` dropped); the same on every TP rank."""
        out = {}
        for name, param in unwrap(module or self._loaded()).named_parameters():
            name = name.replace(".base_layer", "")
            if lora_only and ".lora_" not in name:
                continue
            local = param.detach()
            if convert.split_dim(name) is not None:
                local = convert.unshard(name, _tp_parts(local))
            out[name] = local.cpu()
        return out

    def save_hf(self, out: Path, *, module: torch.nn.Module, strategy: Strategy) -> Path:
        """Write ``out/model`` (HF safetensors) or ``out/hf_adapter`` (PEFT) from a Megatron model."""
        peft = self.is_peft
        state = self.full_state_dict(module, lora_only=peft)  # an adapter export gathers no frozen base weight
        target = Path(out) / ("hf_adapter" if peft else "model")
        if strategy.rank == 0:
            model, config = self._built()
            target.mkdir(parents=True, exist_ok=True)
            if peft:  # apply_megatron_lora set the model's peft_config
                lora = cast("dict[str, Any]", model.peft_config)["default"]
                write_peft_adapter(target, state, config, lora, self.model_id)
            else:
                write_hf_model(target, state, config)
            if self.tokenizer_id is not None:
                self.tokenizer.save_pretrained(target)
        strategy.barrier()
        return target


def LlamaModel(config: GPTConfig | None = None, model_id: str | None = None, **kwargs: Any) -> MegatronGPTModel:  # noqa: N802
    """NeMo's ``llm.LlamaModel(Llama32Config1B())``; pass ``model_id`` for pretrained weights."""
    return MegatronGPTModel(model_id=model_id, config=config, **kwargs)


Qwen2Model = MistralModel = LlamaModel  # the same GPT layer; the config names the family


def _tp_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """This tensor from every tensor-parallel rank, in rank order (just ``[tensor]`` without TP)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(tp)]
    dist.all_gather(parts, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return parts


def load_hf_weights(model: torch.nn.Module, hf_tensors: Mapping[str, torch.Tensor], cfg: GPTConfig, tp: int,
                    tp_rank: int) -> None:
    """Copy converted HF weights (this rank's TP slices) into a Megatron GPTModel, one tensor at a
    time; strict on parameters."""
    params = dict(model.named_parameters())
    unknown, loaded = [], set()
    try:
        with torch.no_grad():
            for name, full in convert.iter_hf_to_megatron(hf_tensors, cfg):
                local = convert.shard(name, full, tp, tp_rank)
                if name not in params or params[name].shape != local.shape:
                    unknown.append(f"{name}{tuple(local.shape)}")
                    continue
                params[name].copy_(local)
                loaded.add(name)
    except KeyError as err:
        raise ConfigError(f"HF -> Megatron conversion: the checkpoint has no tensor {err}") from err
    missing = sorted(params.keys() - loaded)
    if missing or unknown:
        raise ConfigError(f"HF -> Megatron conversion left parameters unset {missing[:4]} or unmatched {unknown[:4]}")


def write_hf_model(target: Path, megatron_state: dict[str, torch.Tensor], cfg: GPTConfig) -> None:
    """A HF folder (safetensors shards + index, config.json) from full Megatron tensors."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    hf = convert.megatron_to_hf(megatron_state, cfg)
    split = split_torch_state_dict_into_shards(hf, filename_pattern="model{suffix}.safetensors")
    for filename, names in split.filename_to_tensors.items():
        save_file({n: hf[n] for n in names}, str(target / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (target / INDEX_FILE).write_text(json.dumps(index, indent=2))
    hf_config = cfg.to_hf()
    hf_config.torch_dtype = str(next(iter(hf.values())).dtype).removeprefix("torch.")
    hf_config.save_pretrained(target)


def write_peft_adapter(target: Path, megatron_lora: dict[str, torch.Tensor], cfg: GPTConfig, lora_config: Any,
                       base_model: str | None) -> None:
    """A PEFT adapter folder (HF module names) from full Megatron LoRA tensors."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    hf = convert.megatron_lora_to_hf(megatron_lora, cfg)
    config = LoraConfig(r=lora_config.r, lora_alpha=lora_config.lora_alpha, lora_dropout=lora_config.lora_dropout,
                        target_modules=convert.hf_lora_targets(hf, cfg.num_layers), bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=base_model, inference_mode=True)
    config.save_pretrained(str(target))
    save_file({f"base_model.model.{k}": v for k, v in hf.items()}, str(target / "adapter_model.safetensors"),
              metadata={"format": "pt"})
