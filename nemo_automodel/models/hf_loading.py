"""Loading a Hugging Face model by id or local folder, shared by the causal-LM and vision-language classes.

One place knows the attention-kernel fallbacks, the one-line load errors and which *kind* of model a
checkpoint is (text-only causal LM or image-text-to-text), so each class refuses the other's models
with a line that names the class to use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from nemo_automodel.errors import ConfigError, bad_value, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

log = logging.getLogger(__name__)

# "auto" (the default): the weights' dtype follows the trainer's precision, fp32 master weights unless it is
# bf16-true (which loads bf16). Not transformers' "auto" (the checkpoint's dtype): a bf16 checkpoint trained
# with fp32 optimizer updates must be loaded in fp32.
DTYPES = {"auto": torch.float32, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
ATTN_FALLBACKS = ("sdpa", "eager")
Kind = Literal["causal_lm", "image_text_to_text"]
_AUTO_CLASS = {"causal_lm": "AutoModelForCausalLM", "image_text_to_text": "AutoModelForImageTextToText"}
_OUR_CLASS = {"causal_lm": "HFAutoModelForCausalLM", "image_text_to_text": "HFAutoModelForImageTextToText"}


def resolve_dtype(value: str | torch.dtype, field: str = "torch_dtype") -> torch.dtype:
    """Map a dtype name (or a torch.dtype) to a torch.dtype, failing with one line otherwise."""
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise bad_value(field, value, f"use one of {sorted(DTYPES)}")
    return DTYPES[name]


def looks_local(model_id: str) -> bool:
    """True for a path rather than a Hub id."""
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).expanduser().exists()


def check_model_folder(model_id: str, field: str = "model_id") -> None:
    """A local ``model_id`` must be a folder with ``config.json``."""
    if looks_local(model_id) and not (Path(model_id).expanduser() / "config.json").is_file():
        raise ConfigError(f"{field}={model_id!r} is not a model folder (no config.json there): "
                          "pass an existing local folder or a Hugging Face model id")


def load_config(model_id: Any, trust_remote_code: bool = False, revision: str | None = None, *,
                local_files_only: bool = False, field: str = "model_id") -> Any:
    """The model's transformers config (``config.json`` only: no weights); a config is returned as it is.

    ``local_files_only`` reads only a local folder or the local Hugging Face cache (the planner never
    downloads); ``field`` names the argument in the one-line errors.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_id, PretrainedConfig):
        return model_id
    model_id = str(model_id)
    check_model_folder(model_id, field)
    local = looks_local(model_id)
    try:
        return AutoConfig.from_pretrained(str(Path(model_id).expanduser()) if local else model_id, revision=revision,
                                          trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        if local_files_only and not local:
            raise ConfigError(f"{field}={model_id!r} is not a local folder and not in the local Hugging Face cache "
                              "(nothing is downloaded here): pass a model folder, or fetch the config first, e.g. "
                              f"`huggingface-cli download {model_id} config.json`") from None
        raise ConfigError(f"{field}={model_id!r} could not be loaded: {first_line(err)} (check the id or folder; "
                          "offline runs need a local folder or a cached model)") from err


def loadable_as(config: Any) -> set[Kind]:
    """The kinds transformers can load this config as (Gemma3, Mllama, Llama4, Qwen3.5 are both)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    mappings: tuple[tuple[Kind, Any], ...] = (("causal_lm", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                                              ("image_text_to_text", MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES))
    return {kind for kind, names in mappings if model_type in names}


def auto_model_class(kind: Kind) -> type[_BaseAutoModelClass]:
    """transformers' ``AutoModelFor<kind>`` class."""
    import transformers

    return getattr(transformers, _AUTO_CLASS[kind])


def kind_with_modules(config: Any, module_names: list[str]) -> tuple[Kind, PreTrainedModel]:
    """The kind whose model, built from ``config`` on the meta device (no weights), has every module in
    ``module_names`` (an adapter's layers), with that model: a VLM config is tried as a VLM first (Mllama's
    text-only class names its layers differently); else the first kind tried, for the caller to report."""
    kinds: list[Kind] = sorted(loadable_as(config), reverse=True) or ["causal_lm"]  # image_text_to_text first
    tried: list[tuple[Kind, PreTrainedModel]] = []
    for kind in kinds:
        with torch.device("meta"):
            model = auto_model_class(kind).from_config(config)
        names = {name for name, _ in model.named_modules()}
        if all(name in names for name in module_names):
            return kind, model
        tried.append((kind, model))
    return tried[0]


def check_kind(config: Any, model_id: str, kind: Kind) -> None:
    """Refuse a checkpoint that transformers cannot load as ``kind`` but can as the other kind (a
    vision-language model given to the causal-LM class, a text-only one to the VLM class), naming the
    class to use. Unknown model types pass: ``from_pretrained`` reports them."""
    kinds = loadable_as(config)
    if kind in kinds or not kinds:
        return
    other = kinds.pop()
    what = "a vision-language" if other == "image_text_to_text" else "a text-only"
    raise ConfigError(f"model_id={model_id!r} is {what} model ({type(config).__name__}): use "
                      f"llm.{_OUR_CLASS[other]}({model_id!r}) instead of llm.{_OUR_CLASS[kind]}")


def load_hf_model(kind: Kind, model_id: str, *, load_pretrained_weights: bool, dtype: torch.dtype,
                  attn_implementation: str, trust_remote_code: bool = False, revision: str | None = None,
                  **extra: Any) -> PreTrainedModel:
    """Load (or randomly initialise from the config) with ``AutoModelFor<kind>``, trying the asked-for
    attention kernel first and then sdpa and eager. ``extra`` goes to ``from_pretrained`` (quantization)."""
    import transformers

    auto = auto_model_class(kind)
    check_model_folder(model_id)
    common = dict(trust_remote_code=trust_remote_code, revision=revision)
    for attn in dict.fromkeys((attn_implementation, *ATTN_FALLBACKS)):
        kwargs = dict(dtype=dtype, attn_implementation=attn, **extra)
        try:
            if load_pretrained_weights:
                model = auto.from_pretrained(model_id, **common, **kwargs)
            else:
                config = transformers.AutoConfig.from_pretrained(model_id, **common)
                model = auto.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
        except (ValueError, ImportError) as err:
            if "attn" not in str(err).lower() and "attention" not in str(err).lower():
                raise ConfigError(f"model_id={model_id!r} could not be loaded: {first_line(err)}") from err
            log.warning("attn_implementation=%r unavailable for %s (%s); trying the next one",
                        attn, model_id, first_line(err))
            continue
        except OSError as err:
            raise ConfigError(f"model_id={model_id!r} could not be loaded: {first_line(err)} "
                              "(check the id or folder; offline runs need a local folder or a cached model)") from err
        if attn != attn_implementation:
            log.warning("using attn_implementation=%r instead of %r", attn, attn_implementation)
        return model
    raise ConfigError(f"attn_implementation={attn_implementation!r}: no working attention kernel for {model_id}")
