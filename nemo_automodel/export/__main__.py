"""``python -m nemo_automodel.export {export,generate,serve}``: the export helpers from the shell.

    python -m nemo_automodel.export export RUN_OR_CHECKPOINT OUT [--mode merged|adapter]
    python -m nemo_automodel.export export RUN_OR_CHECKPOINT OUT --format gguf [--outtype f16|f32|bf16|q8_0]
    python -m nemo_automodel.export generate OUT "prompt" ["prompt" ...] [--max-tokens 64]
    python -m nemo_automodel.export serve OUT [--port 8000] [-- extra vllm serve flags]
"""

from __future__ import annotations

import argparse
import sys

from nemo_automodel.errors import ConfigError
from nemo_automodel.export.export import FORMATS
from nemo_automodel.export.gguf import OUTTYPES


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m nemo_automodel.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("export", help="write a vLLM-ready (or llama.cpp/Ollama GGUF) export of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--mode", choices=("merged", "adapter"), default="merged")
    p.add_argument("--base-model", default=None)
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf: safetensors for vLLM; gguf: one .gguf + Ollama Modelfile")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16", help="GGUF weight type")
    for name in ("generate", "serve"):
        p = sub.add_parser(name, help=f"{name} with vLLM on an export")
        p.add_argument("export_dir")
        p.add_argument("--dtype", default="auto")
        p.add_argument("--python", default=None, help="the vLLM venv's python (default .venv-vllm/bin/python)")
        if name == "generate":
            p.add_argument("prompts", nargs="+")
            p.add_argument("--max-tokens", type=int, default=64)
        else:
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)

    from nemo_automodel import export as ex

    try:
        if args.cmd == "export":
            print(ex.export(args.checkpoint, args.out, mode=args.mode, base_model=args.base_model,
                            format=args.format, outtype=args.outtype))
        elif args.cmd == "generate":
            for prompt, out in zip(args.prompts, ex.generate(args.export_dir, args.prompts, args.max_tokens,
                                                             dtype=args.dtype, python=args.python)):
                print(f"> {prompt}\n{out.text}\n")
        else:
            ex.serve(args.export_dir, host=args.host, port=args.port, dtype=args.dtype, python=args.python,
                     extra=extra)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
