"""JIT compilation as a config node: ``JitConfig`` + the ``JitTransform`` trainer callback.

NeMo 2 spelling: ``JitTransform(JitConfig(use_torch=True, module_selector=..., torch_kwargs={...}))``
goes into ``Trainer(callbacks=[...])``. It runs in ``on_train_start``, after adapters are added and
the model is wrapped, and compiles the selected submodules *in place* (``nn.Module.compile``), so
parameter names, checkpoints and PEFT adapters are unchanged. Works on CPU (inductor, C++) and GPU.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re
from typing import Any

import torch

from nemo_automodel.errors import bad_value
from nemo_automodel.parallel.strategy import unwrap

log = logging.getLogger(__name__)
_BLOCK = re.compile(r"(?:.*\.)?(?:layers|h|blocks|block|decoder_layers)\.\d+")
WHOLE_MODEL = "."


@dataclasses.dataclass
class JitConfig:
    """What to compile and how.

    Args:
        use_torch: compile with ``torch.compile`` (False: the callback does nothing).
        module_selector: ``""`` (default) compiles every decoder block (``*.layers.N``, ``*.h.N``, ...)
            separately: one graph is reused by all blocks, compile is quick and the output layer
            stays eager (needed by the chunked loss). ``"."`` compiles the whole model; any other
            value is an ``fnmatch`` pattern over qualified module names (outermost matches win).
        torch_kwargs: passed to ``torch.compile`` (e.g. ``{"mode": "max-autotune", "dynamic": True}``).
        use_thunder / profile_thunder: NeMo fields; Thunder is not supported here.
    """

    use_torch: bool = False
    module_selector: str = ""
    torch_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    use_thunder: bool = False
    profile_thunder: bool = False

    def __post_init__(self) -> None:
        if self.use_thunder or self.profile_thunder:
            raise bad_value("use_thunder", True, "Thunder is not supported; use use_torch=True")
        if not isinstance(self.torch_kwargs, dict):
            raise bad_value("torch_kwargs", self.torch_kwargs, "a dict of torch.compile arguments")


def select_modules(model: torch.nn.Module, selector: str = "") -> list[tuple[str, torch.nn.Module]]:
    """The outermost submodules of ``model`` that ``selector`` picks (see ``JitConfig``)."""
    if selector == WHOLE_MODEL:
        return [("", model)]
    picked: list[tuple[str, torch.nn.Module]] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p, _ in picked):
            continue
        if _BLOCK.fullmatch(name) if not selector else fnmatch.fnmatchcase(name, selector):
            picked.append((name, mod))
    return picked


def jit_compile(model: torch.nn.Module, config: JitConfig) -> list[str]:
    """Compile the selected submodules of ``model`` in place; return their names."""
    if not config.use_torch:
        return []
    chosen = select_modules(unwrap(model), config.module_selector)
    if not chosen:
        raise bad_value("module_selector", config.module_selector, "a pattern that matches a submodule name")
    for _, mod in chosen:
        mod.compile(**config.torch_kwargs)
    log.info("torch.compile: %d module(s), e.g. %r", len(chosen), chosen[0][0] or "<model>")
    return [n for n, _ in chosen]


class JitTransform:
    """Trainer callback that applies ``JitConfig`` when training starts (after PEFT and wrapping)."""

    def __init__(self, config: JitConfig | None = None, **kwargs: Any) -> None:
        self.config = config or JitConfig(**kwargs)
        self.compiled: list[str] = []

    def on_train_start(self, trainer: Any, module: torch.nn.Module) -> None:
        self.compiled = jit_compile(module, self.config)
