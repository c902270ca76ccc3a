"""`HFAutoModelForImageTextToText`: any Hugging Face vision-language model, loaded lazily by id or folder.

The same contract as ``HFAutoModelForCausalLM`` (``contracts.TrainableModel``): nothing is read until
``check``/``configure_model``; the trainer, strategies, checkpoints and export need no change. Its
``tokenizer`` is the model's processor (tokenizer + image processor + chat template), which the image
data module encodes with and which is saved beside the weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nemo_automodel.contracts import PeftMethod, Strategy
from nemo_automodel.errors import ConfigError, bad_value
from nemo_automodel.models.hf_loading import check_kind, load_config, load_hf_model, resolve_dtype
from nemo_automodel.models.hf_parallel import HFShardingUnits
from nemo_automodel.models.hf_save import save_hf
from nemo_automodel.models.layers import enable_activation_checkpointing
from nemo_automodel.models.loss import masked_cross_entropy
from nemo_automodel.models.processor import has_chat_template, load_processor
from nemo_automodel.models.router_aux import has_router

if TYPE_CHECKING:
    from transformers import ProcessorMixin

# where transformers' VLM families keep their vision encoder (Qwen2-VL: visual; LLaVA, Gemma3: vision_tower;
# Idefics3, SmolVLM, Mllama: vision_model)
VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder", "image_encoder")
_NOT_MODEL_INPUTS = ("labels", "loss_mask", "num_tokens", "position_ids")

log = logging.getLogger(__name__)


def vision_towers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The outermost submodules named like a vision encoder, by qualified name."""
    found: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in VISION_TOWER_NAMES and not any(name.startswith(f + ".") for f in found):
            found[name] = module
    return found


def language_model_prefix(model: torch.nn.Module) -> str:
    """The qualified name of the text decoder (``get_decoder()``), which LoRA targets resolve on."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    for name, module in model.named_modules():
        if decoder is not None and module is decoder and name:
            return name
    raise ConfigError(f"{type(model).__name__}: cannot find its language model (get_decoder() returned "
                      f"{type(decoder).__name__}); pass LoRA target_modules as full regexes instead")


class HFAutoModelForImageTextToText(HFShardingUnits):
    """A vision-language model (``AutoModelForImageTextToText`` + ``AutoProcessor``) from the Hub or a folder.

    Args:
        model_id: Hub id or local folder with ``config.json`` (``model_name``: NeMo's spelling).
        load_pretrained_weights: False builds a randomly initialised model from the config.
        processor: processor id/folder if it differs from ``model_id``.
        torch_dtype, attn_implementation, trust_remote_code (off), revision: as for the causal-LM class.
        freeze_vision_tower: keep the vision encoder frozen (default). With False, full SFT trains it and
            LoRA targets resolve on it too. The projector between the two trains with full SFT.
        activation_checkpointing: recompute the repeated blocks' activations in backward (transformers' own
            non-reentrant switch, as for the causal-LM class).
    """

    def __init__(self, model_id: str | os.PathLike | None = None, load_pretrained_weights: bool = True,
                 processor: str | None = None, torch_dtype: str | torch.dtype = "auto",
                 attn_implementation: str = "sdpa", trust_remote_code: bool = False, revision: str | None = None,
                 model_name: str | None = None, freeze_vision_tower: bool = True,
                 activation_checkpointing: bool = False) -> None:
        model_id = model_id or model_name
        if isinstance(model_id, os.PathLike):
            model_id = str(model_id)
        if not model_id or not isinstance(model_id, str):
            raise bad_value("model_id", model_id, "pass a Hugging Face model id or a local model folder")
        for field, value in (("freeze_vision_tower", freeze_vision_tower),
                             ("activation_checkpointing", activation_checkpointing)):
            if not isinstance(value, bool):
                raise bad_value(field, value, "True or False")
        self.model_id, self.load_pretrained_weights = model_id, load_pretrained_weights
        self.processor_id = processor or model_id
        self.dtype = resolve_dtype(torch_dtype)
        self.attn_implementation, self.trust_remote_code, self.revision = attn_implementation, trust_remote_code, revision
        self.freeze_vision_tower, self.activation_checkpointing = freeze_vision_tower, activation_checkpointing
        self.model: torch.nn.Module | None = None
        self.is_peft = False
        self._processor: ProcessorMixin | None = None

    @property
    def tokenizer(self) -> Any:
        """The processor (loaded on first use); ``.tokenizer`` on it is the text tokenizer."""
        if self._processor is None:
            self._processor = load_processor(self.processor_id, trust_remote_code=self.trust_remote_code,
                                             revision=self.revision)
        return self._processor

    processor = tokenizer

    def check(self, peft: PeftMethod | None, strategy: Strategy) -> None:
        """Refuse, before any weights load, a text-only checkpoint and a processor without a chat template."""
        check_kind(load_config(self.model_id, self.trust_remote_code, self.revision), self.model_id,
                   "image_text_to_text")
        if not has_chat_template(self.tokenizer):
            raise ConfigError(f"the processor of {self.processor_id!r} has no chat template: image chats cannot be "
                              "rendered; use an instruct model's processor or set processor.chat_template")

    def configure_model(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
        """Load (or randomly initialise) onto ``device``; idempotent. ``dtype`` overrides ``torch_dtype``."""
        if self.model is None:
            self.dtype = dtype or self.dtype
            model = load_hf_model("image_text_to_text", self.model_id, load_pretrained_weights=self.load_pretrained_weights,
                                  dtype=self.dtype, attn_implementation=self.attn_implementation,
                                  trust_remote_code=self.trust_remote_code, revision=self.revision)
            # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to): typeshed reads it unbound
            model = model.to(device)  # type: ignore[arg-type]
            self.model = model
            model.config.use_cache = False
            if self.freeze_vision_tower:
                for tower in vision_towers(model).values():
                    tower.requires_grad_(False)
            if self.activation_checkpointing:
                enable_activation_checkpointing(model)
            if has_router(getattr(model.config, "text_config", model.config)):
                log.warning("%s has a mixture-of-experts router: its load-balancing loss is not added on the "
                            "vision-language path (the loss is cross-entropy alone)", type(model).__name__)
        return self.model

    def lora_scope(self) -> list[str]:
        """Module prefixes LoRA targets resolve within: the language model (and the vision tower if it trains)."""
        model = self.configure_model()
        return [language_model_prefix(model), *([] if self.freeze_vision_tower else vision_towers(model))]

    def apply_peft(self, peft: PeftMethod) -> torch.nn.Module:
        """Add ``peft``'s adapters on the language model (see ``lora_scope``); returns the adapted module."""
        scope = self.lora_scope()
        self.model = peft.apply(self.configure_model(), within=scope)
        self.is_peft = True
        return self.model

    @staticmethod
    def forward(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits for a batch: every processor tensor goes in (pixel_values, image_grid_thw, ...), no KV cache."""
        inputs = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
        return module(**inputs, use_cache=False).logits

    def loss(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed masked cross-entropy of a micro-batch; the trainer divides by the step's token count."""
        return masked_cross_entropy(self.forward(module, batch), batch["labels"], batch["loss_mask"])

    def loss_terms(self) -> dict[str, torch.Tensor]:
        """None: the loss is the cross-entropy alone."""
        return {}

    def save_hf(self, out: Path, *, module: torch.nn.Module, strategy: Strategy) -> Path:
        """Write ``out/model`` (safetensors + config + processor) or ``out/hf_adapter`` (PEFT + processor)."""
        return save_hf(out, hf_model=self._loaded(), tokenizer=self.tokenizer, peft=self.is_peft, module=module,
                       strategy=strategy)
