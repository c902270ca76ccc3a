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
from typing import TYPE_CHECKING, Any

import torch

from nemo_automodel.errors import bad_value
from nemo_automodel.parallel.strategy import unwrap
from nemo_automodel.trainer.callbacks import Callback

if TYPE_CHECKING:
    from nemo_automodel.trainer.trainer import Trainer

log = logging.getLogger(__name__)
WHOLE_MODEL = "."


@dataclasses.dataclass
class JitConfig:
    """What to compile and how.

    Args:
        use_torch: compile with ``torch.compile`` (False: the callback does nothing).
        module_selector: ``""`` (default) compiles each of the repeated blocks the model names
            (``TrainableModel.repeated_blocks``: its decoder layers) separately: one graph is reused by
            all blocks, compile is quick and the output layer stays eager (needed by the chunked loss). ``"."`` compiles the whole model; any other
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


def select_modules(model: torch.nn.Module, selector: str = "",
                   blocks: list[torch.nn.Module] | None = None) -> list[tuple[str, torch.nn.Module]]:
    """The outermost submodules of ``model`` that ``selector`` picks (see ``JitConfig``); ``blocks``: the
    model's repeated blocks, what the default selector picks."""
    if selector == WHOLE_MODEL:
        return [("", model)]
    wanted = {id(b) for b in blocks or []}
    picked: list[tuple[str, torch.nn.Module]] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p, _ in picked):
            continue
        if id(mod) in wanted if not selector else fnmatch.fnmatchcase(name, selector):
            picked.append((name, mod))
    return picked


def jit_compile(model: torch.nn.Module, config: JitConfig, blocks: list[torch.nn.Module] | None = None) -> list[str]:
    """Compile the selected submodules of ``model`` in place (``blocks``: its repeated blocks); return their names."""
    if not config.use_torch:
        return []
    chosen = select_modules(unwrap(model), config.module_selector, blocks)
    if not chosen:
        if not config.module_selector:
            raise bad_value("module_selector", "", "the model names no repeated blocks: pick modules with a "
                            "pattern, or '.' for the whole model")
        raise bad_value("module_selector", config.module_selector, "a pattern that matches a submodule name")
    for _, mod in chosen:
        mod.compile(**config.torch_kwargs)
    log.info("torch.compile: %d module(s), e.g. %r", len(chosen), chosen[0][0] or "<model>")
    return [n for n, _ in chosen]


class JitTransform(Callback):
    """Trainer callback that applies ``JitConfig`` when training starts (after PEFT and wrapping), on the
    blocks the trained model names."""

    def __init__(self, config: JitConfig | None = None, **kwargs: Any) -> None:
        self.config = config or JitConfig(**kwargs)
        self.compiled: list[str] = []

    def on_train_start(self, trainer: Trainer, module: torch.nn.Module) -> None:
        blocks = trainer.model.repeated_blocks() if trainer.model is not None else []
        self.compiled = jit_compile(module, self.config, blocks)
