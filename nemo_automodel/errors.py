"""User-facing configuration errors: one line naming the field, the value and what to change."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class ConfigError(ValueError):
    """Bad user input, reported as a single line before any heavy work starts."""


class RunError(RuntimeError):
    """A run that cannot go on for a reason outside its configuration (a full disk, no checkpoint that
    verifies); reported as a single line, exit code 1."""


def bad_value(field: str, value: Any, expected: str) -> ConfigError:
    """Build the standard one-line error: ``field=value: expected ...``."""
    return ConfigError(f"{field}={value!r} is invalid: {expected}")


def check_int(field: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    """Refuse anything but an int >= ``minimum`` (bools too), with the standard one-line error."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad_value(field, value, f"use an integer >= {minimum}" + (" or None" if allow_none else ""))


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def validated(fn: F) -> F:
    """``pydantic.validate_call`` whose failures become a one-line ConfigError.

    The message names the function (or class), the field, the value given and what pydantic
    expected, e.g. ``LoRA: dim=0 is invalid: Input should be greater than or equal to 1``.
    """
    import functools

    from pydantic import ConfigDict, ValidationError, validate_call

    checked = validate_call(config=ConfigDict(arbitrary_types_allowed=True))(fn)
    owner = fn.__qualname__.split(".")[0] if fn.__name__ == "__init__" else fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return checked(*args, **kwargs)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "argument"
            raise ConfigError(f"{owner}: {field}={first.get('input')!r} is invalid: {first['msg']}") from None

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps fn's signature
