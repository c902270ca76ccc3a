"""The package's layering, read from the source (AST), and the backends' conformance to the contracts.

Rules (ARCHITECTURE.md):
- library modules (``nemo_automodel`` minus the facades ``llm`` and ``lightning``) never import the
  facades, ``recipes`` or ``executors``;
- components (contracts, errors, models, peft, data, parallel, checkpoint, tracking, trainer, and the memory
  planner ``plan``) import
  no backend (megatron), no launching, demo or export code, and neither Fiddle nor NeMo-Run (a
  component's ``python -m`` program, ``__main__.py``, sits at the top of the stack and may);
- no import cycles among the project's modules (imports inside functions included);
- the parallelism room (``parallel``) imports nothing from ``models``: the model tells it what to shard
  through ``contracts.TrainableModel``; ``trainer/`` holds no strategy, checkpoint or tracker code.
"""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

import pytest

from nemo_automodel import contracts

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nemo_automodel", "recipes", "executors")
FACADES = ("nemo_automodel.llm", "nemo_automodel.vlm", "nemo_automodel.lightning")
COMPONENTS = ("nemo_automodel.contracts", "nemo_automodel.errors", "nemo_automodel.deprecation", "nemo_automodel.models", "nemo_automodel.peft",
              "nemo_automodel.data", "nemo_automodel.parallel", "nemo_automodel.checkpoint", "nemo_automodel.tracking",
              "nemo_automodel.trainer", "nemo_automodel.plan")
# trainer/ is the loop (and its callbacks, its precision choice), the optimizer module, spawn and JIT; metrics.py is a
# deprecated re-export
TRAINER_MODULES = {"__init__", "trainer", "callbacks", "precision", "optim", "spawn", "jit", "metrics"}
REEXPORTS = ("nemo_automodel/trainer/metrics.py",)
NOT_FOR_COMPONENTS = ("nemo_automodel.megatron", "nemo_automodel.launch", "nemo_automodel.demo",
                      "nemo_automodel.export", "fiddle", "nemo_run")


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: Path = ROOT) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports; ``from pkg import sub`` of a project submodule (under ``root``) counts
    as ``pkg.sub``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names}
            found.update(s for s in subs if _is_module(s, root))
            if not all(_is_module(s, root) for s in subs):
                found.add(node.module)
    return found


def _graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the modules of ``packages`` (under ``root``) it imports, at top level or inside functions."""
    files = {_module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    return {mod: {i for i in _imports(path, root) if i in files and i != mod} for mod, path in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles a depth-first search meets, each as a path ``[a, ..., a]``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    return cycles


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_library_never_imports_facades_recipes_or_executors():
    """``python -m`` programs (``__main__.py``) sit at the top of the stack and may run a recipe."""
    files = [p for p in (ROOT / "nemo_automodel").rglob("*.py")
             if not _under(_module_name(p), FACADES) and p.name != "__main__.py"]
    bad = sorted(f"{_module_name(p)} -> {i}" for p in files for i in _imports(p)
                 if _under(i, FACADES + ("recipes", "executors")))
    assert bad == []


def test_components_know_no_backend_launcher_or_fiddle():
    files = [p for p in (ROOT / "nemo_automodel").rglob("*.py")
             if _under(_module_name(p), COMPONENTS) and p.name != "__main__.py"]
    assert len(files) > 20
    bad = sorted(f"{_module_name(p)} -> {i}" for p in files for i in _imports(p) if _under(i, NOT_FOR_COMPONENTS))
    assert bad == []


def test_parallelism_imports_no_model_module():
    files = list((ROOT / "nemo_automodel" / "parallel").rglob("*.py"))
    assert len(files) >= 4
    bad = sorted(f"{_module_name(p)} -> {i}" for p in files for i in _imports(p)
                 if _under(i, ("nemo_automodel.models",)))
    assert bad == []


def test_trainer_holds_only_the_loop_optimizer_spawn_and_jit():
    """The strategies, checkpoints and trackers live in their own rooms; what is left of them in ``trainer/``
    is a re-export that defines nothing."""
    trainer = ROOT / "nemo_automodel" / "trainer"
    assert {p.stem for p in trainer.glob("*.py")} == TRAINER_MODULES
    for rel in REEXPORTS:
        tree = ast.parse((ROOT / rel).read_text())
        defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert defined == [], rel


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 50
    assert _cycles(graph) == []


def test_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    """The cycle check can fail: a package where ``a`` imports ``b`` and ``b`` imports ``a`` inside a function."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("import os\n\n\ndef f():\n    import pkg.a\n    return pkg.a, os\n")
    (pkg / "c.py").write_text("from pkg.a import b\n")  # imports into the cycle, is not on it
    graph = _graph(tmp_path, ("pkg",))
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    (pkg / "b.py").write_text("import os\n")
    assert _cycles(_graph(tmp_path, ("pkg",))) == []


def test_import_reader_sees_a_facade_import(tmp_path):
    """The layering checks can fail: a facade import written to a file is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("import nemo_automodel.llm\nfrom nemo_automodel.trainer import trainer, Trainer\n")
    assert _imports(bad) == {"nemo_automodel.llm", "nemo_automodel.trainer.trainer", "nemo_automodel.trainer"}


# -- contracts ---------------------------------------------------------------------------------
def _backends():
    import datasets

    from nemo_automodel.data import HFDatasetDataModule
    from nemo_automodel.megatron import MegatronGPTModel, MegatronOptimizerModule, MegatronStrategy
    from nemo_automodel.models import HFAutoModelForCausalLM
    from nemo_automodel.parallel.strategy import DDPStrategy, FSDP2Strategy, SingleDeviceStrategy
    from nemo_automodel.trainer.callbacks import Callback, as_callback
    from nemo_automodel.trainer.jit import JitTransform

    class OneHook:  # a Lightning-style object with only the hook it needs
        def on_train_end(self, trainer):
            pass
    from nemo_automodel.peft import LoRA
    from nemo_automodel.trainer.optim import default_optimizer

    class OptimizerConfig:  # the fields MegatronOptimizerModule reads from megatron-core's dataclass
        optimizer, lr, weight_decay, adam_beta1, adam_beta2, adam_eps, sgd_momentum = "adam", 1e-3, 0, .9, .99, 1e-8, 0
        clip_grad, use_distributed_optimizer = 1.0, False

    return [
        (contracts.TrainableModel, HFAutoModelForCausalLM("org/name")),
        (contracts.TrainableModel, MegatronGPTModel("org/name")),
        (contracts.Strategy, SingleDeviceStrategy()),
        (contracts.Strategy, DDPStrategy()),
        (contracts.Strategy, FSDP2Strategy()),
        (contracts.Strategy, MegatronStrategy()),
        (contracts.DataModule, HFDatasetDataModule(datasets.Dataset.from_list([{"text": "a"}]), formatting="text")),
        (contracts.OptimizerModule, default_optimizer()),
        (contracts.OptimizerModule, MegatronOptimizerModule(OptimizerConfig())),
        (contracts.PeftMethod, LoRA()),
        (contracts.TrainerCallback, Callback()),
        (contracts.TrainerCallback, JitTransform()),
        (contracts.TrainerCallback, as_callback(OneHook())),
    ]


@pytest.mark.parametrize("protocol, impl", _backends(), ids=lambda x: getattr(x, "__name__", type(x).__name__))
def test_backends_implement_the_contracts(protocol, impl):
    """Every member of the protocol exists (without running properties: nothing may load), and methods
    take the protocol's parameters."""
    for name in sorted(typing._get_protocol_attrs(protocol)):
        try:
            inspect.getattr_static(impl, name)
        except AttributeError:
            pytest.fail(f"{type(impl).__name__} lacks {protocol.__name__}.{name}")
        wanted = getattr(protocol, name, None)
        if inspect.isfunction(wanted):
            have = inspect.signature(getattr(type(impl), name)).parameters
            assert set(inspect.signature(wanted).parameters) <= set(have), f"{type(impl).__name__}.{name}{have}"


def test_old_public_paths_still_import_with_a_deprecation_warning():
    """What the README, tutorials and NeMo-style scripts imported before the rooms moved still works."""
    import importlib
    import sys

    from nemo_automodel import checkpoint, parallel, tracking
    from nemo_automodel.tracking import metrics

    for old, new in (("AutoResume", checkpoint), ("FSDP2Strategy", parallel), ("WandbLogger", tracking)):
        with pytest.warns(DeprecationWarning, match=rf"nemo_automodel\.trainer\.{old} is deprecated: use "):
            assert getattr(importlib.import_module("nemo_automodel.trainer"), old) is getattr(new, old)
    sys.modules.pop("nemo_automodel.trainer.metrics", None)
    with pytest.warns(DeprecationWarning, match="moved to nemo_automodel.tracking.metrics"):
        old_metrics = importlib.import_module("nemo_automodel.trainer.metrics")
    assert old_metrics.read_metrics is metrics.read_metrics
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        importlib.import_module("nemo_automodel.trainer").Nope  # noqa: B018
