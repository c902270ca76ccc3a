"""User-facing configuration errors: one line naming the field, the value and what to change."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """Bad user input, reported as a single line before any heavy work starts."""


def bad_value(field: str, value: Any, expected: str) -> ConfigError:
    """Build the standard one-line error: ``field=value: expected ...``."""
    return ConfigError(f"{field}={value!r} is invalid: {expected}")


def validated(fn):
    """``pydantic.validate_call`` whose failures become a one-line ConfigError.

    The message names the function (or class), the field, the value given and what pydantic
    expected, e.g. ``LoRA: dim=0 is invalid: Input should be greater than or equal to 1``.
    """
    import functools

    from pydantic import ConfigDict, ValidationError, validate_call

    checked = validate_call(fn, config=ConfigDict(arbitrary_types_allowed=True))
    owner = fn.__qualname__.split(".")[0] if fn.__name__ == "__init__" else fn.__name__

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return checked(*args, **kwargs)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "argument"
            raise ConfigError(f"{owner}: {field}={first.get('input')!r} is invalid: {first['msg']}") from None

    return wrapper
