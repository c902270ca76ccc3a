"""Names that moved or were renamed: a module ``__getattr__`` that still returns them, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved_names(module: str, names: dict[str, str]) -> Callable[[str], Any]:
    """The ``__getattr__`` for ``module``: ``names`` maps an old attribute to ``"new.module:NewName"``."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target_module, _, target = names[name].partition(":")
        warnings.warn(f"{module}.{name} is deprecated: use {target_module}.{target}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(target_module), target)

    return __getattr__
