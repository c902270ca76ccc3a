"""Can vLLM serve this PEFT adapter? Checked statically, before any vLLM process starts.

The rules mirror what vLLM (0.32, ``vllm/lora``) accepts, plus one it does not enforce: every
adapter weight must name a layer the base model really has, since vLLM silently skips adapter
weights whose module path matches no layer (only the last name component is checked there).

- peft ``LORA`` only; no DoRA, LoRA bias, adapter bias, aLoRA, QALoRA, BD-LoRA, layer replication,
  trainable tokens, ``modules_to_save`` (full copies of layers) or inits that rewrite the base
  weights (PiSSA, OLoRA, CorDA, LoftQ);
- no LoRA on fused expert weights (peft ``target_parameters``, a mixture-of-experts model's experts);
- rank at most 512 (vLLM's ``max_lora_rank`` takes the values in ``VLLM_LORA_RANKS``);
- LoRA on ``nn.Linear`` and ``nn.Embedding`` layers only: GPT-2-style ``Conv1D`` or convolution
  layers cannot be served (vLLM's GPT-2 has no LoRA support at all). Whether the architecture
  takes embedding / lm_head adapters is checked in the vLLM venv before the engine starts
  (``vllm_runner.check_engine_spec``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from nemo_automodel.errors import ConfigError, first_line

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA", "lora_bias": "LoRA bias (lora_bias)", "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA", "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "layer_replication": "layer_replication", "trainable_token_indices": "trainable tokens",
}
SUPPORTED_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")
_BASE_EMBEDDING = re.compile(r"\.(embed_tokens|lm_head)\.base_layer\.weight$")


@dataclass(frozen=True)
class AdapterInfo:
    """What serving an adapter needs: the base model, vLLM's ``max_lora_rank`` and the adapted layers."""

    base_model: str
    max_lora_rank: int
    modules: tuple[str, ...]


def _fail(adapter_dir: Path, why: str) -> ConfigError:
    return ConfigError(f"adapter {str(adapter_dir)!r} cannot be served by vLLM: {why}")


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file() or not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{str(adapter_dir)!r} is not a complete PEFT adapter (needs adapter_config.json and "
                          "adapter_model.safetensors)")
    return json.loads(path.read_text())


def check_config(adapter_dir: Path, cfg: dict) -> int:
    """Reject adapter features vLLM does not implement; return the adapter's largest rank."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _fail(adapter_dir, f"peft_type={cfg.get('peft_type')!r}; vLLM serves LoRA adapters only")
    for key, name in UNSUPPORTED_FLAGS.items():
        if cfg.get(key):
            raise _fail(adapter_dir, f"{key}={cfg[key]!r}: vLLM does not support {name}; export mode='merged'")
    if cfg.get("bias", "none") != "none":
        raise _fail(adapter_dir, f"bias={cfg['bias']!r}: vLLM supports bias='none' only; export mode='merged'")
    if cfg.get("target_parameters"):
        raise _fail(adapter_dir, f"target_parameters={cfg['target_parameters']!r}: LoRA on fused expert weights, which "
                                 "vLLM's LoRA serving does not load; export mode='merged'")
    if cfg.get("modules_to_save"):
        raise _fail(adapter_dir, f"modules_to_save={cfg['modules_to_save']!r}: vLLM does not load fully trained "
                                 "layers next to an adapter; export mode='merged'")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in SUPPORTED_INITS:
        raise _fail(adapter_dir, f"init_lora_weights={init!r} rewrites the base weights; export mode='merged'")
    rank = max([int(cfg.get("r", 8)), *map(int, (cfg.get("rank_pattern") or {}).values())])
    if rank > VLLM_LORA_RANKS[-1]:
        raise _fail(adapter_dir, f"rank {rank} exceeds vLLM's maximum LoRA rank {VLLM_LORA_RANKS[-1]}")
    return rank


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest value vLLM's ``max_lora_rank`` accepts that fits ``rank``."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def adapted_modules(adapter_dir: Path) -> list[str]:
    """Module paths (base-model names) that carry LoRA weights in ``adapter_model.safetensors``."""
    from safetensors import safe_open

    modules: dict[str, None] = {}
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if _BASE_EMBEDDING.search(key):
                continue  # peft saves the (frozen) embedding next to its adapter; vLLM skips it too
            match = _LORA_KEY.match(key)
            if not match:
                raise _fail(adapter_dir, f"tensor {key!r} is not a LoRA A/B weight (vLLM loads LoRA A/B "
                                         "weights only); export mode='merged'")
            modules[match.group(1)] = None
    if not modules:
        raise _fail(adapter_dir, "adapter_model.safetensors holds no LoRA weights")
    return list(modules)


def _meta_model(base_model: str, modules: list[str]):
    """The base model's module tree on the meta device (no weights are read), built with the auto class
    (vision-language or causal LM) whose layers the adapter names."""
    from transformers import AutoConfig

    from nemo_automodel.models.hf_loading import kind_with_modules

    try:
        config = AutoConfig.from_pretrained(base_model)
    except (OSError, ValueError) as err:
        raise ConfigError(f"base model {base_model!r} could not be read: {first_line(err)} "
                          "(pass base_model= a local folder or a reachable Hub id)") from err
    return kind_with_modules(config, modules)[1]


def check_servable(adapter_dir: str | Path, base_model: str | None = None) -> AdapterInfo:
    """Raise a one-line ConfigError unless vLLM can serve ``adapter_dir`` on ``base_model``."""
    import torch

    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    base = base_model or cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"adapter {str(adapter_dir)!r} names no base model: pass base_model=")
    rank = check_config(adapter_dir, cfg)
    modules = adapted_modules(adapter_dir)
    layers = dict(_meta_model(base, modules).named_modules())
    for name in modules:
        layer = layers.get(name)
        if layer is None:
            raise _fail(adapter_dir, f"its weights for {name!r} match no layer of {base!r}; vLLM would silently "
                                     "ignore them (wrong base model, or keys saved with a wrapper prefix)")
        if not isinstance(layer, torch.nn.Linear | torch.nn.Embedding):
            raise _fail(adapter_dir, f"{name!r} is a {type(layer).__name__} layer; vLLM serves LoRA on Linear "
                                     "and Embedding layers only (not Conv1D or convolutions); export mode='merged'")
    return AdapterInfo(base_model=str(base), max_lora_rank=vllm_max_lora_rank(rank), modules=tuple(modules))
