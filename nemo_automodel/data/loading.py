"""Open a dataset source with the ``datasets`` library and pick a split (aliases, slices).

Sources: a ``Dataset`` or ``DatasetDict``, local data files (.json/.jsonl/.parquet/.csv/.txt,
a list of them, or a ``{split: files}`` dict), a folder written by ``save_to_disk``, a folder of
data files, or a Hub dataset name (passed to ``datasets.load_dataset`` with ``split``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nemo_automodel.errors import ConfigError, bad_value

if TYPE_CHECKING:  # datasets is imported where data is loaded: building a graph stays fast
    import datasets

SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "val", "valid", "dev", "eval"),
    "test": ("test", "testing"),
}
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
            ".arrow": "arrow"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_SPLIT_RE = re.compile(r"^\s*([\w.-]+)\s*(\[.*\])?\s*$")
FIELD = "path_or_dataset"


def _suffix(path: str) -> str:
    p = Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def looks_local(name: str) -> bool:
    """True for strings that are paths rather than Hub dataset names."""
    return (os.path.exists(name) or name.startswith(("/", ".", "~")) or name.count("/") > 1
            or _suffix(name) in BUILDERS)


def _builder(files: list[str]) -> str:
    kinds = {BUILDERS.get(_suffix(f)) for f in files}
    kind = kinds.pop() if len(kinds) == 1 else None
    if kind is None:
        raise bad_value(FIELD, files if len(files) > 1 else files[0],
                        f"data files of one kind among {sorted(BUILDERS)} (optionally compressed)")
    return kind


def _bad_json_line(files: list[str]) -> str | None:
    """Find the first line of a JSON Lines file that does not parse (only used to explain errors)."""
    for f in files:
        if f.endswith(_COMPRESSED) or (_suffix(f) != ".jsonl" and not _is_json_lines(f)):
            continue
        with open(f, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError as e:
                        return f"{f} line {n} is not valid JSON ({e})"
    return None


def _is_json_lines(f: str) -> bool:
    if _suffix(f) != ".json":
        return False
    with open(f, encoding="utf-8", errors="replace") as fh:
        head = fh.read(1024).lstrip()
    return head.startswith("{")


def _is_blank(path: str, chunk: int = 1 << 20) -> bool:
    """True for an empty or whitespace-only file (reads only until the first other byte)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return False
    return True


def check_data_files(files: list[str]) -> None:
    """Each local data file exists and holds more than whitespace."""
    for f in files:
        if not os.path.isfile(f):
            raise ConfigError(f"{FIELD}: data file {f!r} does not exist: check the path")
        if _is_blank(f):
            raise ConfigError(f"{FIELD}: data file {f!r} is empty: pass a file with at least one row")


def check_local_source(source: Any) -> None:
    """Refuse missing or empty local data files when the data module is built (before any loading)."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    files_only = (str, os.PathLike, list, tuple)  # not a DatasetDict, whose values are datasets
    if isinstance(source, Mapping) and all(isinstance(v, files_only) for v in source.values()):
        check_data_files([f for v in source.values() for f in _as_list(v)])
    elif isinstance(source, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in source):
        check_data_files(_as_list(source))
    elif isinstance(source, str) and os.path.isfile(os.path.expanduser(source)):
        check_data_files([os.path.expanduser(source)])


def _load_files(data_files: dict[str, list[str]], load_kwargs: dict[str, Any]) -> datasets.DatasetDict:
    import datasets

    files = [f for fs in data_files.values() for f in fs]
    check_data_files(files)
    try:
        return datasets.load_dataset(_builder(files), data_files=data_files, **load_kwargs)
    except ConfigError:
        raise
    except Exception as e:
        cause = e.__cause__ or e
        where = _bad_json_line(files) or f"could not read {', '.join(files)}: {type(cause).__name__}: {cause}"
        raise ConfigError(f"{FIELD}: {where}: fix the file or pass another one") from e


def _load_folder(path: str, load_kwargs: dict[str, Any]) -> datasets.DatasetDict:
    import datasets

    p = Path(path)
    if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
        loaded = datasets.load_from_disk(path)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    try:
        return datasets.load_dataset(path, **load_kwargs)
    except Exception as e:
        raise ConfigError(f"{FIELD}: could not load folder {path!r}: {type(e).__name__}: {e}") from e


def open_local(source: Any, load_kwargs: dict[str, Any]) -> datasets.DatasetDict | None:
    """All splits of an in-memory or local source; None for a Hub name (loaded per split)."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        return source
    if isinstance(source, datasets.Dataset):
        return datasets.DatasetDict(train=source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, Mapping):
        return _load_files({str(k): _as_list(v) for k, v in source.items()}, load_kwargs)
    if isinstance(source, (list, tuple)):
        return _load_files({"train": _as_list(source)}, load_kwargs)
    if not isinstance(source, str) or not source:
        raise bad_value(FIELD, source, "a datasets.Dataset/DatasetDict, a local path, or a Hub dataset name")
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return _load_folder(path, load_kwargs)
    if os.path.isfile(path):
        return _load_files({"train": [path]}, load_kwargs)
    if looks_local(source):
        raise ConfigError(f"{FIELD}={source!r}: no such file or folder: check the path")
    return None


def _as_list(files: Any) -> list[str]:
    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    return [os.path.expanduser(os.fspath(f)) for f in items]


def parse_split(split: str, field: str = "split") -> tuple[str, str]:
    """``"train[:100]"`` -> ``("train", "[:100]")``."""
    m = _SPLIT_RE.match(split) if isinstance(split, str) else None
    if not m:
        raise bad_value(field, split, "a split name, optionally sliced, e.g. 'train' or 'train[:100]'")
    return m.group(1), m.group(2) or ""


def canonical_split(name: str) -> str:
    """Map an alias (val, valid, dev, eval, ...) to train / validation / test."""
    for canon, aliases in SPLIT_ALIASES.items():
        if name.lower() in aliases:
            return canon
    return name


def resolve_split(name: str, available: list[str], field: str = "split") -> str:
    """The available split that ``name`` means: itself, else one of its aliases."""
    if name in available:
        return name
    aliases = SPLIT_ALIASES.get(canonical_split(name), ())
    for candidate in available:
        if candidate.lower() in aliases:
            return candidate
    raise bad_value(field, name, f"one of the available splits {available}")


def slice_dataset(ds: datasets.Dataset, name: str, spec: str, field: str = "split") -> datasets.Dataset:
    """Apply a ``datasets`` slice spec such as ``[:100]`` or ``[10%:20%]`` to one split."""
    import datasets

    if not spec:
        return ds
    try:
        instr = datasets.ReadInstruction.from_spec(f"{name}{spec}").to_absolute({name: len(ds)})
    except (ValueError, AssertionError) as e:
        expected = f"a valid slice like 'train[:100]' or 'train[10%:]' ({e})"
        raise bad_value(field, f"{name}{spec}", expected) from e
    lo, hi = instr[0].from_, instr[0].to
    return ds.select(range(lo, hi) if hi > lo else [])


def load_split(source: Any, splits: datasets.DatasetDict | None, split: str, field: str,
               load_kwargs: dict[str, Any]) -> datasets.Dataset:
    """One split (with aliases and slices) of an opened source, or from the Hub."""
    name, spec = parse_split(split, field)
    if splits is None:
        return _load_hub(source, canonical_split(name) + spec, field, load_kwargs)
    resolved = resolve_split(name, list(splits), field)
    return slice_dataset(splits[resolved], resolved, spec, field)


def _load_hub(name: str, split: str, field: str, load_kwargs: dict[str, Any]) -> datasets.Dataset:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, **load_kwargs)
    except ValueError as e:
        if "split" in str(e).lower():
            raise bad_value(field, split, f"a split of {name!r}: {e}") from e
        raise ConfigError(f"{FIELD}={name!r}: could not load it from the Hub: {e}") from e
    except Exception as e:
        raise ConfigError(f"{FIELD}={name!r}: could not load it from the Hub: {type(e).__name__}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):  # split=None cannot reach here, but be defensive
        raise bad_value(field, split, f"a single split of {name!r}")
    return ds
