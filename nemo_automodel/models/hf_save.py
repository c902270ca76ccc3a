"""Save a HF model as a Hugging Face folder (safetensors model or PEFT adapter) without a rank-0 gather.

Every rank writes the shards it holds with ``torch.distributed.checkpoint`` and its
``HuggingFaceStorageWriter(save_distributed=True, enable_consolidation=True)``; rank 0 then
stitches the shards into full-tensor safetensors files file-to-file, one tensor at a time. So
no rank ever materialises the whole model (FSDP2), and the same code path serves DDP (replicas
are written once) and a single process. Output:

    model/       model.safetensors (or model-0000i-of-0000N.safetensors + index) + config + tokenizer
    hf_adapter/  adapter_model.safetensors + adapter_config.json + tokenizer
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from nemo_automodel.contracts import Strategy

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size
INDEX_FILE = "model.safetensors.index.json"


def save_hf(out: Path, *, hf_model: torch.nn.Module, tokenizer: Any, peft: bool, module: torch.nn.Module,
            strategy: Strategy) -> Path:
    """Write ``out/model`` (full SFT) or ``out/hf_adapter`` (LoRA) from every rank; returns the folder.

    ``hf_model`` is the (peft-wrapped) HF model, ``module`` what the strategy wrapped around it.
    """
    import torch.distributed.checkpoint as dcp  # imported on use: graph builds stay fast
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    target = Path(out) / ("hf_adapter" if peft else "model")
    state = get_model_state_dict(module, options=StateDictOptions(ignore_frozen_params=peft))
    state = _drop_tied(state, hf_model)
    if peft:
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(hf_model, state_dict=state)  # PEFT's on-disk key names
    writer = HuggingFaceStorageWriter(str(target), fqn_to_index_mapping=_shard_plan(state),
                                      save_distributed=True, enable_consolidation=True)
    dcp.save(state, storage_writer=writer, no_dist=not strategy.is_distributed)
    if strategy.rank == 0:
        _finish(target, hf_model, tokenizer, peft)
    strategy.barrier()
    return target


def _drop_tied(state: dict, hf_model: torch.nn.Module) -> dict:
    """Keep one name per shared parameter (tied embeddings), as ``save_pretrained`` does."""
    seen: set[int] = set()
    tied = set()
    for name, param in hf_model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return {k: v for k, v in state.items() if k not in tied}


def _shard_plan(state: dict) -> dict[str, int]:
    """Tensor name -> output file index (1-based), filling files up to ``MAX_SHARD_BYTES``."""
    plan, index, used = {}, 1, 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()  # global size, also for DTensor shards
        if used and used + size > MAX_SHARD_BYTES:
            index, used = index + 1, 0
        plan[name] = index
        used += size
    return plan


def _finish(target: Path, hf_model: torch.nn.Module, tokenizer, peft: bool) -> None:
    """Rank 0: drop the per-rank shards, name files as HF/PEFT expect, add config and tokenizer."""
    shutil.rmtree(target / "sharded", ignore_errors=True)
    files = sorted(target.glob("model-*-of-*.safetensors"))
    if len(files) == 1:
        files[0].rename(target / ("adapter_model.safetensors" if peft else "model.safetensors"))
        (target / INDEX_FILE).unlink(missing_ok=True)
    if peft:
        config = copy.deepcopy(cast("PeftModel", hf_model).peft_config["default"])
        config.inference_mode = True
        config.save_pretrained(str(target))
    else:
        cast("PreTrainedModel", hf_model).config.save_pretrained(target)
        generation = getattr(hf_model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(target)
    tokenizer.save_pretrained(target)
