"""Export checkpoints for vLLM and run vLLM on them (generation helper, OpenAI-compatible server)."""

from nemo_automodel.export.deploy import Completion, Job, generate, generate_jobs, serve, serve_command
from nemo_automodel.export.export import export, read_export, resolve_checkpoint
from nemo_automodel.export.servable import check_servable

__all__ = ["Completion", "Job", "check_servable", "export", "generate", "generate_jobs", "read_export",
           "resolve_checkpoint", "serve", "serve_command"]
