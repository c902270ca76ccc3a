"""Export checkpoints for vLLM and run vLLM on them (generation helper, OpenAI-compatible server).

``Job`` was renamed ``GenerationJob``; the old name still imports, with a DeprecationWarning.
"""

from nemo_automodel.deprecation import moved_names
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


__getattr__ = moved_names(__name__, {"Job": "nemo_automodel.export:GenerationJob"})
