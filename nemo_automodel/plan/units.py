"""Memory sizes: ``"80GiB"``-style strings to bytes and bytes to GiB."""

from __future__ import annotations

import re

from nemo_automodel.errors import bad_value

GIB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_memory(text: str | int | float, field: str = "--gpu-memory") -> int:
    """Bytes in ``text``: a size with a unit, ``80GiB``, ``80 GB`` (10^9), ``141G`` (10^9), ``512MiB``;
    a string without a unit is GiB (``"80"``, how GPU memory is usually quoted); an int or float is bytes.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), "b"
    else:
        match = _SIZE.fullmatch(str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise bad_value(field, text, "use a size such as 80GiB, 80GB, 141G or 512MiB")
        value, unit = float(match.group(1)), match.group(2).lower() or "gib"
    if value <= 0:
        raise bad_value(field, text, "use a size > 0, e.g. 80GiB")
    return int(value * _UNITS[unit])


def gib(n_bytes: float) -> float:
    """Bytes in GiB."""
    return n_bytes / GIB


def human(n_bytes: float) -> str:
    """Bytes as ``"1.50 GiB"``, or ``"412.5 MiB"`` below a GiB."""
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / (1 << 20):.1f} MiB"
