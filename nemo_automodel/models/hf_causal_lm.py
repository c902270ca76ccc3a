"""`HFAutoModelForCausalLM`: any Hugging Face causal LM, loaded lazily by id or local folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nemo_automodel.contracts import PeftMethod, Strategy
from nemo_automodel.errors import ConfigError, bad_value, check_int
from nemo_automodel.models.chunked_ce import fused_lm_head_loss, lean_head_unsupported
from nemo_automodel.models.hf_loading import check_kind, load_config, load_hf_model, resolve_dtype
from nemo_automodel.models.hf_parallel import HFShardingUnits, hf_model
from nemo_automodel.models.hf_save import save_hf
from nemo_automodel.models.layers import enable_activation_checkpointing
from nemo_automodel.models.loss import masked_cross_entropy
from nemo_automodel.models.quantization import (
    after_load,
    check_trainable,
    load_kwargs,
    prepare_for_training,
    resolve_quantization,
)
from nemo_automodel.models.router_aux import router_aux_coef, router_aux_loss
from nemo_automodel.models.tokenizer import TokenizerAdapter, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

class HFAutoModelForCausalLM(HFShardingUnits):
    """A causal LM from the Hub or a local folder; nothing is read until `configure_model`.

    Args:
        model_id: Hub id (``org/name``) or a local folder with ``config.json``.
        load_pretrained_weights: False builds a randomly initialised model from the config.
        tokenizer: tokenizer id/folder if it differs from ``model_id``.
        torch_dtype: parameter dtype: ``auto`` (fp32, or bf16 when the trainer's precision is ``bf16-true``),
            ``float32``, ``bfloat16``, ``float16``.
        attn_implementation: asked-for attention kernel; falls back to sdpa, then eager, when
            the architecture or machine does not support it.
        trust_remote_code: run model code shipped with the checkpoint (off by default).
        model_name: NeMo 25.02 spelling of ``model_id``.
        use_liger_kernel: on CUDA, patch the model with liger-kernel's Triton kernels (RMSNorm,
            RoPE, SwiGLU) and use its fused linear cross-entropy (``pip install '.[liger]'``).
            Triton cannot run on CPU: there a one-line notice is logged and the chunked loss is used.
        chunked_loss: compute the loss from the final hidden states and the output layer's weight
            without materializing ``[tokens, vocab]`` logits. True/"auto": cut-cross-entropy on
            CUDA when installed, else the pure-torch chunked loss; or "torch" / "cce" explicitly.
        loss_chunk_size: tokens per chunk of the torch chunked loss (default: about 4 M logits per chunk).
        activation_checkpointing: recompute each decoder layer's activations in backward instead of
            keeping them (non-reentrant, per layer): about half the activation memory for ~1.4x
            step time. LoRA and full SFT, one process, DDP, FSDP2, torch.compile and resume.
        quantization: QLoRA's 4-bit base through bitsandbytes (``pip install '.[qlora]'``): ``"nf4"``,
            ``"fp4"`` or a dict of ``BitsAndBytesConfig`` 4-bit arguments; compute dtype bf16 unless
            the dict sets ``bnb_4bit_compute_dtype``. Needs a PEFT method (LoRA), pretrained weights,
            one device or DDP. See ``models/quantization.py``.
        router_aux_loss_coef: mixture-of-experts families: the weight of the router load-balancing loss added
            to ours (``models/router_aux.py``); None takes the config's ``router_aux_loss_coef``, 0 switches it
            off. Logged as ``router_aux_loss`` (without the coefficient). Refused for a model without a router.
    """

    def __init__(self, model_id: str | os.PathLike | None = None, load_pretrained_weights: bool = True,
                 tokenizer: str | None = None, torch_dtype: str | torch.dtype = "auto",
                 attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                 revision: str | None = None, model_name: str | None = None, use_liger_kernel: bool = False,
                 chunked_loss: bool | str = False, loss_chunk_size: int | None = None,
                 activation_checkpointing: bool = False, quantization: str | dict | None = None,
                 router_aux_loss_coef: float | None = None) -> None:
        model_id = model_id or model_name
        if isinstance(model_id, os.PathLike):
            model_id = str(model_id)
        if not model_id or not isinstance(model_id, str):
            raise bad_value("model_id", model_id, "pass a Hugging Face model id or a local model folder")
        self.model_id = model_id
        self.load_pretrained_weights = load_pretrained_weights
        self.tokenizer_id = tokenizer or model_id
        self.dtype = resolve_dtype(torch_dtype)
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.revision = revision
        if chunked_loss not in (False, True, "auto", "torch", "cce"):
            raise bad_value("chunked_loss", chunked_loss, "True, False, 'auto', 'torch' or 'cce'")
        check_int("loss_chunk_size", loss_chunk_size, allow_none=True)
        self.use_liger_kernel, self.chunked_loss, self.loss_chunk_size = use_liger_kernel, chunked_loss, loss_chunk_size
        if not isinstance(activation_checkpointing, bool):
            raise bad_value("activation_checkpointing", activation_checkpointing, "True or False")
        self.activation_checkpointing = activation_checkpointing
        self.quantization = resolve_quantization(quantization)
        if self.quantization and not load_pretrained_weights:
            raise ConfigError("quantization needs load_pretrained_weights=True: bitsandbytes quantizes the "
                              "weights as from_pretrained loads them")
        self.model: torch.nn.Module | None = None
        self.is_peft = False
        self._tokenizer = None
        self._loss_impl: str | None = None  # None: plain logits + masked_cross_entropy
        self.router_aux_loss_coef = router_aux_loss_coef
        self._aux_coef = 0.0  # decided from the config in configure_model
        self._terms: dict[str, torch.Tensor] = {}
        self._state_space = False  # the model has SSM (Mamba) layers: packed rows would share their state

    # -- loading -------------------------------------------------------------------------
    @staticmethod
    def configure_tokenizer(model_name: str, trust_remote_code: bool = False) -> TokenizerAdapter:
        """NeMo-compatible: a tokenizer wrapper exposing ``.tokenizer``, ``text_to_ids``, ``eos_id``."""
        return TokenizerAdapter(load_tokenizer(model_name, trust_remote_code=trust_remote_code))

    @property
    def tokenizer(self):
        """The transformers tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_id, trust_remote_code=self.trust_remote_code,
                                             revision=self.revision)
        return self._tokenizer

    def configure_model(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
        """Load (or randomly initialise) the model onto ``device``; idempotent. ``dtype`` (the trainer's
        ``bf16-true``) overrides ``torch_dtype`` for the loaded weights."""
        if self.model is None:
            self.dtype = dtype or self.dtype
            # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to): typeshed reads it unbound
            model: PreTrainedModel = self._load().to(device)  # type: ignore[arg-type]
            self.model = model
            model.config.use_cache = False
            if self.activation_checkpointing:
                enable_activation_checkpointing(model)
            self._loss_impl = self._pick_loss_impl(model, torch.device(device))
            self._aux_coef = router_aux_coef(model.config, self.router_aux_loss_coef)
            self._state_space = any("mamba" in type(m).__name__.lower() for m in model.modules())
        return self.model

    def _pick_loss_impl(self, model: PreTrainedModel, device: torch.device) -> str | None:
        """Apply liger-kernel on CUDA and choose how the loss is computed (see the class docstring)."""
        chunked = self.chunked_loss
        if self.use_liger_kernel:
            if device.type == "cuda":
                return apply_liger_kernel(model)
            log.warning("use_liger_kernel=True needs CUDA (Triton kernels do not run on %s): "
                        "using the chunked torch loss instead", device.type)
            chunked = chunked or "torch"
        if chunked in (True, "auto"):
            chunked = "cce" if device.type == "cuda" and _importable("cut_cross_entropy") else "torch"
        if chunked == "cce" and not _importable("cut_cross_entropy"):
            raise ConfigError("chunked_loss='cce' needs cut-cross-entropy: pip install cut-cross-entropy "
                              "(or use chunked_loss=True for the pure-torch chunked loss)")
        return chunked if isinstance(chunked, str) else None  # True/"auto" became a name above

    def _load(self) -> PreTrainedModel:
        model = load_hf_model("causal_lm", self.model_id, load_pretrained_weights=self.load_pretrained_weights,
                              dtype=self.dtype, attn_implementation=self.attn_implementation,
                              trust_remote_code=self.trust_remote_code, revision=self.revision,
                              **load_kwargs(self.quantization))
        if self.quantization:
            after_load(model)  # in place
        return model

    def check(self, peft: PeftMethod | None, strategy: Strategy) -> None:
        """Refuse, in one line before any weights load, what this model cannot train: a vision-language
        checkpoint (config.json is read), a 4-bit base without ``peft`` or sharded by FSDP2."""
        check_trainable(self.quantization, peft, strategy.name)
        check_kind(load_config(self.model_id, self.trust_remote_code, self.revision), self.model_id, "causal_lm")

    def apply_peft(self, peft: PeftMethod) -> torch.nn.Module:
        """Add ``peft``'s adapters (a ``contracts.PeftMethod``) to the loaded model; returns it."""
        model = self.configure_model()
        self.model = peft.apply(prepare_for_training(model) if self.quantization else model)
        self.is_peft = True
        return self.model

    # -- training ------------------------------------------------------------------------
    @staticmethod
    def forward(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits for a batch (no KV cache, so packed position ids keep samples apart)."""
        return HFAutoModelForCausalLM._outputs(module, batch).logits

    @staticmethod
    def _outputs(module: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        return module(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False, **kwargs)

    def loss(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed masked cross-entropy of a micro-batch (plus, in training, the router load-balancing term of a
        mixture-of-experts model, ``models/router_aux.py``); the trainer divides by the step's token count."""
        if self._state_space and "position_ids" in batch and bool((batch["position_ids"][:, 1:] == 0).any()):
            raise ConfigError(f"{type(hf_model(self._loaded())).__name__} has state-space (Mamba) layers, which "
                              "carry their state from one packed sample into the next: set the data module's "
                              "packed_sequence_size=0")
        with_router = bool(self._aux_coef) and module.training
        extra = {"output_router_logits": True} if with_router else {}
        impl = self._loss_impl
        if impl is not None and self.model is not None and (why := lean_head_unsupported(self.model)) is not None:
            log.warning("chunked loss disabled: %s; computing full logits", why)
            self._loss_impl = impl = None
        if impl is not None:
            with fused_lm_head_loss(self._loaded(), batch["labels"], batch["loss_mask"], self.loss_chunk_size,
                                    impl) as out:
                outputs = self._outputs(module, batch, **extra)
            loss = out["loss"]
        else:
            outputs = self._outputs(module, batch, **extra)
            loss = masked_cross_entropy(outputs.logits, batch["labels"], batch["loss_mask"])
        if not with_router:
            return loss
        aux = router_aux_loss(hf_model(self._loaded()), outputs.router_logits, batch) * batch["loss_mask"].sum()
        self._terms["router_aux_loss"] = self._terms.get("router_aux_loss", 0) + aux.detach().double()
        return loss + self._aux_coef * aux

    def loss_terms(self) -> dict[str, torch.Tensor]:
        """``{"router_aux_loss": ...}`` summed since the last call like the loss (per loss token), without its
        coefficient; {} for a dense model. The call clears them."""
        terms, self._terms = self._terms, {}
        return terms

    # -- saving --------------------------------------------------------------------------
    def save_hf(self, out: Path, *, module: torch.nn.Module, strategy: Strategy) -> Path:
        """Write ``out/model`` (HF safetensors + config + tokenizer) or ``out/hf_adapter`` (PEFT)."""
        return save_hf(out, hf_model=self._loaded(), tokenizer=self.tokenizer, peft=self.is_peft, module=module,
                       strategy=strategy)


def apply_liger_kernel(model: torch.nn.Module) -> str:
    """Patch ``model`` in place with liger-kernel's Triton kernels; the loss then uses its fused CE."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as err:
        raise ConfigError("use_liger_kernel=True needs liger-kernel: pip install '.[liger]'") from err
    # the fused CE is called by our loss (token-weighted sum), not through the model's own loss
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
    return "liger"


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None

