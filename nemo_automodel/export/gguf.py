"""A merged HF model folder → one GGUF file for llama.cpp and Ollama (its Modelfile: ``ollama.py``).

Built on the ``gguf`` package (``GGUFWriter``, ``get_tensor_name_map``, ``SpecialVocab``,
``gguf.quants``); tensors are streamed one at a time, so memory stays near one tensor. What travels
inside the file: the weights (``f32``/``f16``/``bf16``/``q8_0``; norms and biases stay f32), the
hyperparameters, the byte-level BPE tokenizer (tokens, types, merges, special ids, add-bos/eos
flags) and the chat template (``tokenizer.chat_template``).

Layout facts llama.cpp needs that HF folders do not state:

- llama.cpp's ``llama`` architecture rotates adjacent pairs of each q/k head, HF Llama/Mistral rotate
  (first half, second half): q/k rows are permuted on the way out (Qwen2 uses llama.cpp's
  half-split rope and is written as is);
- Mistral is written as ``llama`` (same tensors); a sliding window shorter than the context caps the
  GGUF's context length at the window, where full attention and the window agree;
- Llama 3.1+ rope scaling (``rope_type="llama3"``) travels as llama.cpp's ``rope_freqs`` tensor: the
  default inverse frequencies divided by transformers' scaled ones (transformers' own GGUF loader
  ignores that tensor, llama.cpp applies it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_automodel.errors import ConfigError, bad_value
from nemo_automodel.export.ollama import chat_template, end_of_turn

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# HF architecture -> (gguf MODEL_ARCH member, q/k rows need llama.cpp's pair-interleaved rope layout)
ARCHITECTURES = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
}
ROPE_TYPES = ("default", "linear", "llama3")
SKIPPED = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Source:
    """What a conversion reads from the model folder."""

    folder: Path
    config: Any
    arch: str
    permute_qk: bool
    tokenizer: Any
    files: tuple[Path, ...]


def check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise bad_value("outtype", outtype, f"use one of {OUTTYPES}")
    return outtype


def _source(model_dir: str | Path) -> Source:
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(model_dir).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{str(folder)!r} is not a HF model folder (no config.json)")
    config = AutoConfig.from_pretrained(folder)
    archs = list(getattr(config, "architectures", None) or [])
    supported = [a for a in archs if a in ARCHITECTURES]
    if not supported:
        raise ConfigError(f"GGUF export: architecture {archs or config.model_type!r} is not supported; "
                          f"supported: {', '.join(ARCHITECTURES)}")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ConfigError(f"GGUF export: {str(folder)!r} holds no tokenizer (tokenizer.json): "
                          "the GGUF must carry one")
    files = tuple(sorted(folder.glob("*.safetensors")))
    if not files:
        raise ConfigError(f"GGUF export: {str(folder)!r} holds no *.safetensors weights")
    arch, permute = ARCHITECTURES[supported[0]]
    if _rope(config)[1] == "llama3" and arch != "LLAMA":
        raise ConfigError(f"GGUF export: rope scaling 'llama3' on {supported[0]} is not supported")
    return Source(folder, config, arch, permute, AutoTokenizer.from_pretrained(folder), files)


# ---------------------------------------------------------------------------- hyperparameters
def _rope(config: Any) -> tuple[float, str, float | None]:
    """``(theta, rope_type, linear factor)`` from transformers 5's ``rope_parameters`` (or v4 fields).
    Other scalings (yarn, dynamic, longrope) are refused: llama.cpp would need more than a type here."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"GGUF export: rope scaling {kind!r} is not supported; supported: {ROPE_TYPES}")
    return float(theta), kind, params.get("factor") if kind == "linear" else None


def _context_length(config: Any) -> int:
    length = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True)  # Qwen2 says; Mistral's window is always on
    if window and uses_window and window < length:
        length = int(window)
    return length


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _rope_factors(config: Any) -> Any:
    """llama.cpp's ``rope_freqs`` for llama3 rope scaling: default / scaled inverse frequency, per pair."""
    import numpy as np
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, _, _ = _rope(config)
    dim = _head_dim(config)
    default = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (default / scaled.double().numpy()).astype(np.float32)


def _add_hparams(writer: Any, src: Source, n_vocab: int, outtype: str, name: str) -> None:
    import gguf

    cfg = src.config
    theta, _, factor = _rope(cfg)
    head_dim = _head_dim(cfg)
    writer.add_name(name)
    writer.add_context_length(_context_length(cfg))
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(theta)
    if factor is not None:  # linear scaling, the only kind with a factor (transformers requires it there)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[outtype]
    writer.add_file_type(gguf.LlamaFileType[file_type])
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------------------- tokenizer
def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for the tokenizer.json pre-tokenizer (``tokenizer.ggml.pre``); split regexes are
    looked up in transformers' table of llama.cpp names (``GGUF_PRE_TOKENIZER_SPLITS``)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # another transformers layout: only the regex-free shapes below are known
        GGUF_PRE_TOKENIZER_SPLITS = {}

    steps = (spec or {}).get("pretokenizers", [spec]) if (spec or {}).get("type") == "Sequence" else [spec]
    kinds = [(s or {}).get("type") for s in steps]
    first, last = steps[0] or {}, steps[-1] or {}
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2"  # GPT-2's own split regex
    if kinds == ["Digits", "ByteLevel"] and first.get("individual_digits") and last.get("use_regex", True):
        return "smollm"  # single digits, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        regex = (first.get("pattern") or {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():  # first name per regex: llama3, qwen2, tekken, ...
            if split == regex:
                return name
    raise ConfigError(f"GGUF export: the tokenizer's pre-tokenizer {kinds} has no llama.cpp equivalent known to "
                      "this exporter (supported: GPT-2 byte-level, SmolLM, Qwen2, Llama 3 and Tekken splits)")


def _tokenizer_model(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("GGUF export: the tokenizer has no tokenizer.json (fast tokenizer) to convert")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConfigError(f"GGUF export: a {model.get('type')} tokenizer"
                          f"{' with byte fallback (sentencepiece style)' if model.get('byte_fallback') else ''} "
                          "is not supported; supported: byte-level BPE (GPT-2 style: SmolLM2, Qwen2, Llama 3)")
    return spec


def _tokens(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types, padded with unused ``[PADn]`` up to the model's rows."""
    import gguf

    size = len(tokenizer)
    if size > n_vocab:
        raise ConfigError(f"GGUF export: the tokenizer has {size} tokens but the model only {n_vocab} embedding rows")
    added = tokenizer.added_tokens_decoder
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(n_vocab):
        token = tokenizer.convert_ids_to_tokens(i) if i < size else None
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special or (i in added and added[i].special):
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _adds(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds bos / eos, measured on the tokenizer itself."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos


def _add_tokenizer(writer: Any, src: Source, n_vocab: int) -> None:
    import gguf

    tok = src.tokenizer
    spec = _tokenizer_model(tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer")))
    tokens, types = _tokens(tok, n_vocab)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    vocab = gguf.SpecialVocab(src.folder, load_merges=True, n_vocab=n_vocab)
    if not vocab.merges:
        raise ConfigError(f"GGUF export: the tokenizer in {str(src.folder)!r} has no BPE merges")
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id}
    eot = end_of_turn(tok)
    if eot is not None and eot != tok.eos_token:
        ids["eot"] = tok.convert_tokens_to_ids(eot)
    vocab.special_token_ids = {k: int(v) for k, v in ids.items() if v is not None}
    add_bos, add_eos = _adds(tok)
    vocab.add_special_token = {"bos": add_bos, "eos": add_eos}
    vocab.chat_template = chat_template(tok)
    vocab.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------------------- tensors
def _tensor_names(files: tuple[Path, ...]) -> Iterator[tuple[Path, str, list[int]]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield file, name, list(f.get_slice(name).get_shape())


def _qtype(name: str, shape: list[int], outtype: str) -> Any:
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2 or outtype == "f32":
        return Q.F32
    if outtype == "q8_0":
        return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16
    return Q.BF16 if outtype == "bf16" else Q.F16


def _nbytes(shape: list[int], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    count = 1
    for dim in shape:
        count *= dim
    return count // block * size


def _interleave_rope(weight: Any, heads: int) -> Any:
    """HF's (first half, second half) rotary rows of each head → adjacent pairs (llama.cpp's llama rope)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _convert(array: Any, qtype: Any) -> Any:
    import gguf
    import numpy as np

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def _plan(src: Source, outtype: str) -> list[tuple[Path, str, str, list[int], Any]]:
    """``(file, hf name, gguf name, shape, qtype)`` per written tensor, in file order."""
    import gguf

    cfg = src.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[src.arch], cfg.num_hidden_layers)
    plan, unknown = [], []
    for file, name, shape in _tensor_names(src.files):
        if name.endswith(SKIPPED) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            unknown.append(name)
        else:
            plan.append((file, name, target, shape, _qtype(target, shape, outtype)))
    if unknown:
        raise ConfigError(f"GGUF export: {len(unknown)} tensor(s) have no GGUF name for {src.arch.lower()}, "
                          f"e.g. {unknown[0]!r}")
    return plan


def _tensor(src: Source, file: Path, name: str) -> Any:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        array = f.get_tensor(name).float().numpy()
    cfg = src.config
    if src.permute_qk and (".q_proj." in name or ".k_proj." in name):
        heads = cfg.num_attention_heads if ".q_proj." in name else (cfg.num_key_value_heads or cfg.num_attention_heads)
        array = _interleave_rope(array, heads)
    return array


# ---------------------------------------------------------------------------- entry points
def convert(model_dir: str | Path, out_file: str | Path, outtype: str = "f16", name: str | None = None) -> Path:
    """Write ``model_dir`` (a merged HF model with its tokenizer) as the GGUF file ``out_file``.

    ``name`` is the GGUF's ``general.name`` (default: the file's stem). The file appears complete or
    not at all (written under a temporary name, then renamed). Raises a one-line ConfigError for an
    unsupported architecture, outtype, rope scaling or tokenizer.
    """
    import gguf
    import numpy as np

    check_outtype(outtype)
    src = _source(model_dir)
    plan = _plan(src, outtype)
    n_vocab = next((shape[0] for _, _, target, shape, _ in plan if target == "token_embd.weight"), None)
    if n_vocab is None:
        raise ConfigError(f"GGUF export: {str(src.folder)!r} has no token embedding (model.embed_tokens.weight)")
    out = Path(out_file).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[src.arch]])
    try:
        _add_hparams(writer, src, n_vocab, outtype, name or out.stem)
        _add_tokenizer(writer, src, n_vocab)
        extra = {}
        if _rope(src.config)[1] == "llama3":
            extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = _rope_factors(src.config)
        for target, array in extra.items():
            writer.add_tensor_info(target, list(array.shape), array.dtype, array.nbytes)
        for _, _, target, shape, qtype in plan:
            writer.add_tensor_info(target, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for array in extra.values():
            writer.write_tensor_data(array)
        for file, hf_name, _, _, qtype in plan:
            writer.write_tensor_data(_convert(_tensor(src, file, hf_name), qtype))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
