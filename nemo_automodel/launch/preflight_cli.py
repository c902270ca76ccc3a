"""The data preflight's command line: ``nemo automodel preflight``.

    nemo automodel preflight <recipe | model id | model folder> [key=value …] [--samples 3] [--html out.html]

Builds only the recipe's data node and its model's tokenizer (no weights), formats the data as
training will and prints the preflight (``nemo_automodel.data.preflight``): samples with the trained
tokens marked, lengths, truncation, dropped rows, packing and tokens per optimizer step.
Exit codes: 0 passes, 1 the data has a problem (printed), 2 bad input (one line on stderr).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import fiddle as fdl

from nemo_automodel.errors import ConfigError
from nemo_automodel.launch.guard import OneLineParser, command_main
from nemo_automodel.launch.nemo_run_cli import apply_overrides

EXIT_OK, EXIT_PROBLEM, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> OneLineParser:
    p = OneLineParser(prog="nemo automodel preflight", description="What will this job train on? Checks the data "
                "with the tokenizer alone: trained tokens, truncation, end-of-turn in the loss, packing.",
                epilog="Exit codes: 0 passes, 1 the data has a problem, 2 bad input.")
    p.add_argument("target", help="recipe factory name, Hugging Face model id or local model folder")
    p.add_argument("--samples", type=int, default=3, help="samples to render with trained tokens marked")
    p.add_argument("--html", default=None, help="also write the samples and summary to this HTML file")
    p.add_argument("--stop-token", action="append", default=[], help="another token that ends a reply")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    return p


def run_preflight_cli(argv: list[str], resolve: Callable[[str], Any]) -> int:
    """Parse ``argv``, print the preflight of the recipe ``resolve(target)`` returns; the exit code."""
    from nemo_automodel.data.preflight import preflight

    args = _parser().parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"{bad[0]!r} is not an option or a key=value override (see --help)")
    recipe = apply_overrides(resolve(args.target), args.overrides)
    for node in ("data", "model"):
        if not isinstance(getattr(recipe, node, None), fdl.Buildable):
            raise ConfigError(f"recipe {args.target!r} has no {node} node to preflight")
    trainer = getattr(recipe, "trainer", None)
    dp_size = (getattr(trainer, "devices", 1) or 1) * (getattr(trainer, "num_nodes", 1) or 1) \
        if isinstance(trainer, fdl.Buildable) else 1
    data, model = fdl.build(recipe.data), fdl.build(recipe.model)  # lazy model: only its tokenizer loads
    report = preflight(data, model.tokenizer, samples=args.samples, stop_tokens=args.stop_token, dp_size=dp_size)
    color = sys.stdout.isatty() if args.color == "auto" else args.color == "always"
    print(report.render(color=color))
    if args.html:
        print(f"HTML: {report.to_html(args.html)}")
    return EXIT_OK if report.ok else EXIT_PROBLEM


def main(argv: list[str] | None, resolve: Callable[[str], Any]) -> int:
    """The command: the preflight on stdout, or one ``error: …`` line on stderr and exit 2."""
    return command_main(lambda args: run_preflight_cli(args, resolve), argv)
