"""CLI tests run with the config they write, never with AIDNODE_* overrides from the caller."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AIDNODE_"):
            monkeypatch.delenv(name)
