"""Run a recipe graph from the command line with one-line errors and honest exit codes."""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from nemo_automodel.errors import ConfigError, RunError, first_line

EXIT_RUN_ERROR, EXIT_CONFIG_ERROR = 1, 2


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a ConfigError into ``error: <one line>`` on stderr and exit code 2, a RunError (full disk,
    no checkpoint that verifies) into the same with exit code 1; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, RunError) as err:
            # Fiddle appends its build context on later lines; the cause is the first line.
            print(f"error: {first_line(err)}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG_ERROR if isinstance(err, ConfigError) else EXIT_RUN_ERROR) from None

    return wrapper


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are ConfigErrors (one line, exit 2) instead of usage text."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def command_main(run: Callable[[list[str]], int], argv: list[str] | None) -> int:
    """Run a command's ``run(argv)``; bad input becomes one ``error: …`` line on stderr and exit 2."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return run(list(sys.argv[1:] if argv is None else argv))
    except (ConfigError, ValueError, TypeError) as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


def run_graph(graph) -> Any:
    """Build a `run.Partial`/`run.Config` graph and call it, under `guard` (a graph with a tracker on
    its ``log`` node records its flattened values as params: `tracker_params.with_tracker_params`)."""
    import fiddle as fdl

    from nemo_automodel.launch.tracker_params import with_tracker_params

    return guard(lambda: fdl.build(with_tracker_params(graph))())()
