"""The memory planner's command line: ``nemo automodel plan`` and ``python -m nemo_automodel.plan``.

    nemo automodel plan <recipe | model id | model folder> --gpus 8 --gpu-memory 80GiB --seq 4096 [key=value …]
    python -m nemo_automodel.plan meta-llama/Meta-Llama-3-8B --gpus 8 --gpu-memory 80GiB --seq 4096 peft=None

A recipe is a registered factory name (``hf_auto_model_for_causal_lm``, ``smollm2_135m``, …); a model
id or folder plans ``recipes/hf_auto_model_for_causal_lm.py``'s recipe for that model. ``key=value``
overrides are the recipe command line's (``peft=None``, ``trainer.precision=bf16-true``,
``model.activation_checkpointing=True``, ``data.micro_batch_size=1``, …). Model ids are read from the
local Hugging Face cache only. ``--gpus`` sets the number of devices in all (with
``trainer.strategy.tensor_parallel_size=T`` / ``context_parallel_size=C`` the replicas are gpus / (T x C)), ``--seq`` the tokens
per row (the packed row size when the recipe packs). With ``trainer.fit_memory=80GiB`` it also prints what the
trainer would change to fit that budget (``plan/fit.py``). Exit codes: 0 fits (or no --gpu-memory), 1 does not fit
(or nothing ``fit_memory`` may change fits), 2 bad input (one line on stderr).

Which recipe a name stands for is the caller's to say (``resolve``, e.g. `recipe_cli.plan_target` once the
recipes are imported): a library module never imports ``recipes``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nemo_automodel.errors import ConfigError
from nemo_automodel.launch.guard import OneLineParser, command_main
from nemo_automodel.launch.nemo_run_cli import apply_overrides
from nemo_automodel.launch.plan_recipe import fit_recipe, plan_recipe, recipe_fit_memory
from nemo_automodel.plan.units import parse_memory

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> OneLineParser:
    p = OneLineParser(prog="nemo automodel plan", description="Will a fine-tuning job fit in GPU memory, and what to "
                "change? Configs are read offline (model folders or the local Hugging Face cache).",
                epilog="Exit codes: 0 fits, 1 does not fit, 2 bad input.")
    p.add_argument("target", help="recipe factory name, Hugging Face model id (cached) or local model folder")
    p.add_argument("--gpus", type=int, default=None, help="devices in all (default: the recipe's)")
    p.add_argument("--gpu-memory", default=None, help="memory per device, e.g. 80GiB, 80GB, 141G")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default: the recipe's)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="what the job runs on (default: cuda unless trainer.accelerator=cpu)")
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    return p


def run_plan(argv: list[str], resolve: Callable[[str], Any]) -> int:
    """Parse ``argv``, print the plan of the recipe ``resolve(target)`` returns; the exit code
    (ConfigError on bad input)."""
    args = _parser().parse_intermixed_args(argv)
    for flag, value in (("--gpus", args.gpus), ("--seq", args.seq)):
        if value is not None and value < (1 if flag == "--gpus" else 2):
            raise ConfigError(f"{flag}={value} is invalid: use an integer >= {1 if flag == '--gpus' else 2}")
    budget = None if args.gpu_memory is None else parse_memory(args.gpu_memory)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"{bad[0]!r} is not an option or a key=value override (see --help)")
    recipe = apply_overrides(resolve(args.target), args.overrides)
    recipe_fit_memory(recipe)  # a bad trainer.fit_memory is bad input
    result = plan_recipe(recipe, gpus=args.gpus, gpu_memory=budget, seq=args.seq, device=args.device)
    print(result)
    try:  # trainer.fit_memory=…: what the trainer would change to fit it
        fit = fit_recipe(recipe, gpus=args.gpus, seq=args.seq, device=args.device)
    except ConfigError as err:
        print(f"fit_memory: the job would stop before loading: {err}")
        return EXIT_DOES_NOT_FIT
    if fit:
        print("\n".join(fit))
    return EXIT_DOES_NOT_FIT if result.fits is False else EXIT_FITS


def main(argv: list[str] | None, resolve: Callable[[str], Any]) -> int:
    """The command: the plan on stdout, or one ``error: …`` line on stderr and exit 2."""
    return command_main(lambda args: run_plan(args, resolve), argv)
