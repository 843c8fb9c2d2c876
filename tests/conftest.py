"""Shared fixtures. Layer-specific fixtures live next to their tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cli_cmd() -> list[str]:
    """argv prefix that runs the installed CLI in a subprocess."""
    return [sys.executable, "-m", "autoglm.node.cli"]
