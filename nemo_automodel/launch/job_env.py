"""The environment every job needs, whichever executor starts it.

NeMo-Run launches jobs as the literal ``python -m nemo_run.core.runners.fdl_runner …``, so the
interpreter that has ``nemo_run`` and ``nemo_automodel`` installed must come first on ``PATH``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

from nemo_automodel.errors import bad_value, check_int

#: Variables copied from the launching shell into a job when set (Docker jobs inherit nothing).
PASSTHROUGH = ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN",
               "NEMO_AUTOMODEL_CACHE", "TOKENIZERS_PARALLELISM")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def venv_bin() -> str:
    """The ``bin`` folder of the running interpreter's environment (a venv, conda env or system)."""
    return str(Path(sys.executable).parent)


def job_env(env_vars: dict[str, str] | None = None, path: str | None = None) -> dict[str, str]:
    """``PATH`` led by this venv's bin, unbuffered output, the `PASSTHROUGH` variables, then ``env_vars``."""
    env = {k: os.environ[k] for k in PASSTHROUGH if k in os.environ}
    env["PATH"] = f"{venv_bin()}:{path or os.environ.get('PATH', '/usr/local/bin:/usr/bin:/bin')}"
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (env_vars or {}).items():
        if not _ENV_NAME.match(str(key)):
            raise bad_value("env_vars key", key, "use letters, digits and '_', not starting with a digit")
        env[str(key)] = str(value)
    return env


def python_roots() -> list[str]:
    """Folders a container needs (read-only, at the same path) to run this interpreter and venv.

    The venv, the base interpreter it was made from, and the source folders of editable
    installs (``nemo_automodel``, ``recipes``, ``executors`` when installed with ``pip install -e``).
    """
    roots = {sys.prefix, sys.base_prefix}
    for pkg in ("nemo_automodel", "recipes", "executors"):  # located, not imported
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:  # not importable here: nothing of it to mount
            continue
        src = Path(spec.origin).resolve().parent.parent
        if not str(src).startswith(sys.prefix):
            roots.add(str(src))
    # drop folders already inside another mounted folder
    ordered = sorted(roots, key=len)
    return [r for i, r in enumerate(ordered) if not any(r.startswith(p.rstrip("/") + "/") for p in ordered[:i])]


def resolve_launcher(ntasks_per_node: int, launcher: str | None, multi: bool | None = None) -> str | None:
    """Validate ``ntasks_per_node`` and turn ``launcher='auto'`` into torchrun when several ranks run."""
    check_int("ntasks_per_node", ntasks_per_node)
    if launcher == "auto":
        launcher = "torchrun" if (ntasks_per_node > 1 if multi is None else multi) else None
    if launcher not in (None, "torchrun"):
        raise bad_value("launcher", launcher, "use 'torchrun', None or 'auto'")
    return launcher
