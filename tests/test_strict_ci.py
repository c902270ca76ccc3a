"""Under .ci/run a missing engine, venv or extra fails the test instead of skipping it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import STRICT_ENV, require_module, unavailable

TESTS = Path(__file__).parent


def test_missing_engine_skips_outside_ci(monkeypatch):
    monkeypatch.delenv(STRICT_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="dockerd not installed"):
        unavailable("dockerd not installed")


def test_missing_engine_fails_under_ci(monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="dockerd not installed .*CI must provide it"):
        unavailable("dockerd not installed")
    with pytest.raises(pytest.fail.Exception, match="cannot import no_such_module_here"):
        require_module("no_such_module_here", "an extra is missing")


def test_no_test_routes_around_the_strict_helpers():
    """A missing extra reaches ``require_module``/``unavailable``: no test skips it, drops a case for it
    (``find_spec(...)``) or passes without it. Tests that fake a missing wheel patch ``find_spec``, not call it."""
    quiet = ("importorskip(", "except ImportError", "except ModuleNotFoundError", "find_spec(")
    allowed = {TESTS / "helpers.py", Path(__file__)}
    found = [f"{path.relative_to(TESTS)}: {word}" for path in sorted(TESTS.rglob("*.py")) if path not in allowed
             for word in quiet if word in path.read_text()]
    assert not found, found


@pytest.mark.slow
def test_gpu_tests_skip_for_cuda_before_their_packages_under_ci():
    """Without CUDA the gpu tests skip as such under ``.ci/run`` even where their packages are missing
    (liger-kernel and cut-cross-entropy are not in ``make venv``); with CUDA the package check fails them."""
    files = ["perf/test_gpu_kernels.py", "megatron/test_gpu.py", "models/test_qlora_gpu.py"]
    env = {**os.environ, STRICT_ENV: "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           *(str(TESTS / f) for f in files)], capture_output=True, text=True, env=env,
                          cwd=TESTS.parent, timeout=600)
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert proc.returncode == 0 and "7 skipped" in proc.stdout, proc.stdout[-3000:]
    assert skips and all(line.endswith(": needs CUDA") for line in skips), skips


def test_a_skip_other_than_cuda_fails_the_run_under_ci(tmp_path):
    """The suite's own check (tests/conftest.py): under ``.ci/run`` a skip passes only when it names CUDA."""
    test = tmp_path / "test_skips.py"
    test.write_text("import pytest\n\ndef test_engine():\n    pytest.skip('no engine here')\n\n"
                    "def test_gpu():\n    pytest.skip('needs CUDA')\n")
    for strict, only_cuda, code in (("1", False, 1), ("1", True, 0), ("0", False, 0)):
        args = [str(test)] + (["-k", "gpu"] if only_cuda else [])
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                               *args], capture_output=True, text=True, cwd=TESTS.parent, timeout=300,
                              env={**os.environ, STRICT_ENV: strict})
        assert proc.returncode == code, proc.stdout[-2000:]
        assert ("test_skips.py::test_engine - Skipped: no engine here" in proc.stdout) == (code == 1)  # + rootdir
