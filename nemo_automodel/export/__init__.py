"""Export checkpoints for vLLM and run vLLM on them (generation helper, OpenAI-compatible server).

``Job`` was renamed ``GenerationJob``; the old name still imports, with a DeprecationWarning.
"""

import warnings
from typing import Any

from nemo_automodel.export.deploy import (
    Completion,
    GenerationJob,
    generate,
    generate_jobs,
    serve,
    serve_command,
)
from nemo_automodel.export.export import export, read_export, resolve_checkpoint
from nemo_automodel.export.servable import check_servable

__all__ = ["Completion", "GenerationJob", "check_servable", "export", "generate", "generate_jobs", "read_export",
           "resolve_checkpoint", "serve", "serve_command"]


def __getattr__(name: str) -> Any:
    if name != "Job":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn("nemo_automodel.export.Job was renamed nemo_automodel.export.GenerationJob", DeprecationWarning,
                  stacklevel=2)
    return GenerationJob
