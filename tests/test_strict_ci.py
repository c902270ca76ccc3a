"""Under .ci/run a missing engine, venv or extra fails the test instead of skipping it."""

from __future__ import annotations

import pytest

from tests.helpers import STRICT_ENV, require_module, unavailable


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
