"""Parameter sweeps: list-valued command-line overrides expand to the cartesian product of runs.

    optim.optimizer_fn.lr=[1e-4,3e-4] peft.dim=[8,16]   ->   4 runs, named lr-1e-4_dim-8, ...

An override is a sweep axis when its value is a bracketed list and the attribute it sets does not
already hold a list (``peft.target_modules=[q_proj,v_proj]`` stays a plain assignment; sweep
such an attribute with a list of lists). This module is pure text and file handling:
`experiment.sweep_tasks` applies each combination to the recipe graph (for the CLI,
`launch/recipe_cli.py`, and `Experiment.add_sweep`), which run as one experiment.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_automodel.errors import ConfigError

_KEY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_TASK_NAME = 64  # Slurm job names and NeMo-Run task folders stay short (experiment names allow 128)
SUMMARY_KEYS = ("step", "train_loss", "val_loss", "lr", "tokens_per_sec")


@dataclass(frozen=True)
class Axis:
    """One swept attribute: ``key`` (a dotted path) and its values (command-line text, or Python values
    from `Experiment.add_sweep`)."""

    key: str
    values: tuple[Any, ...]


def split_list(text: str, key: str = "value") -> list[str]:
    """Split ``"[a,b,(c,d)]"`` into its top-level items; a malformed list is a `ConfigError`."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise ConfigError(f"sweep {key}={text!r} is malformed: a list must start with '[' and end with ']'")
    items, depth, quote, current = [], 0, "", ""
    for ch in text[1:-1]:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                break
        elif ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
            continue
        current += ch
    if depth != 0 or quote:
        raise ConfigError(f"sweep {key}={text!r} is malformed: unbalanced brackets or quotes")
    items.append(current.strip())
    if items == [""]:
        raise ConfigError(f"sweep {key}={text!r} is empty: give at least one value")
    if any(not item for item in items):
        raise ConfigError(f"sweep {key}={text!r} is malformed: empty item between commas")
    if len(set(items)) != len(items):
        raise ConfigError(f"sweep {key}={text!r} repeats a value")
    return items


def find_axes(args: Sequence[str], holds_list: Callable[[str], bool]) -> tuple[list[str], list[Axis]]:
    """Split ``key=value`` overrides into fixed ones and sweep axes.

    ``holds_list(key)`` tells whether the attribute already holds a list (then a flat list is a
    plain assignment and only a list of lists sweeps it).
    """
    fixed: list[str] = []
    axes: list[Axis] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        value = value.strip()
        if not sep or key.endswith(("+", "-", "*", "/", "|", "&")) or not value.startswith("["):
            fixed.append(arg)
            continue
        if not _KEY.match(key):
            raise ConfigError(f"override {arg!r} is malformed: the key must be a dotted attribute path")
        if not value.endswith("]"):
            split_list(value, key)  # raises with the reason
        is_list = holds_list(key)
        items = split_list(value, key)
        if is_list and not all(item.startswith("[") for item in items):
            fixed.append(arg)
            continue
        if key in {a.key for a in axes}:
            raise ConfigError(f"sweep key {key!r} is given twice")
        axes.append(Axis(key, tuple(items)))
    return fixed, axes


def expand(axes: Sequence[Axis]) -> list[dict[str, Any]]:
    """The cartesian product, first axis slowest: ``[{key: value, ...}, ...]``."""
    return [dict(zip([a.key for a in axes], combo)) for combo in itertools.product(*(a.values for a in axes))]


def task_name(combo: dict[str, str]) -> str:
    """A short, shell- and path-safe name: the last key segment (or the full key if ambiguous) and value."""
    last = [k.rsplit(".", 1)[-1] for k in combo]
    parts = []
    for key, short in zip(combo, last):
        label = short if last.count(short) == 1 else key.replace(".", "-")
        parts.append(f"{label}-{combo[key].strip(chr(39) + chr(34))}")
    name = _SAFE.sub("_", "_".join(parts)).strip("_.") or "task"
    if len(name) > MAX_TASK_NAME:  # long values: keep the start readable, a hash keeps the names distinct
        digest = hashlib.sha1("\0".join(f"{k}={v}" for k, v in combo.items()).encode()).hexdigest()[:10]
        name = f"{name[:MAX_TASK_NAME - 11].rstrip('_.-')}-{digest}"
    return name


def final_metrics(run_dir: str | Path) -> dict[str, float]:
    """The last logged value of each metric in ``<run_dir>/metrics.jsonl`` (empty if absent)."""
    path = Path(run_dir) / "metrics.jsonl"
    last: dict[str, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                last.update(json.loads(line))
    return last


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return "-" if value is None else str(value)


def summary_table(rows: Sequence[dict]) -> str:
    """Markdown table of ``rows`` (dicts: task, status, the swept keys, final metrics, run_dir)."""
    if not rows:
        return ""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def summary_rows(tasks: Sequence[tuple[str, dict[str, str], str, Path | None]]) -> list[dict]:
    """One row per ``(name, combo, status, run_dir)``: the swept values, then the final metrics."""
    rows = []
    for name, combo, status, run_dir in tasks:
        metrics = final_metrics(run_dir) if run_dir else {}
        row: dict[str, Any] = {"task": name, "status": status, **combo}
        row.update({k: metrics.get(k) for k in SUMMARY_KEYS})
        row["run_dir"] = str(run_dir) if run_dir else None
        rows.append(row)
    return rows
