"""Shared CLI plumbing: consoles, JSON output, exit codes."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from autoglm.node.errors import (
    AutoglmError,
    ConfigError,
    IntegrityError,
    ProtocolError,
    SourceError,
    StorageError,
    TrustError,
    VerificationRefused,
)

__all__ = ["EXIT", "console", "err_console", "exit_code_for", "human_bytes", "print_json"]

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

#: Documented in docs/operations.md; scripts rely on these numbers.
EXIT = {
    "ok": 0,
    "error": 1,
    "usage": 2,
    "integrity": 3,
    "trust": 4,
    "malformed": 5,
    "source": 6,
    "storage": 7,
    "refused": 8,
    "interrupted": 130,
}

_ORDER: list[tuple[type[BaseException], str]] = [
    (ConfigError, "usage"),
    (IntegrityError, "integrity"),
    (TrustError, "trust"),
    (ProtocolError, "malformed"),
    (SourceError, "source"),
    (StorageError, "storage"),
    (VerificationRefused, "refused"),
]


def exit_code_for(exc: AutoglmError) -> int:
    for cls, name in _ORDER:
        if isinstance(exc, cls):
            return EXIT[name]
    return EXIT["error"]


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=None, sort_keys=True) + "\n")
    sys.stdout.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
