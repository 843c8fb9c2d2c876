"""Shared CLI plumbing: consoles, JSON output, exit codes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

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

__all__ = [
    "EXIT", "console", "err_console", "errors_reported", "exit_code_for", "human_bytes", "print_json", "relay_control",
]

if TYPE_CHECKING:
    import socket

    from rich.console import Console


class _LazyConsole:
    """A rich Console made on first use: importing rich costs ~50 ms that
    `fetch --json` handed to a running node never needs."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._console: Console | None = None

    def _get(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    # rich's Live and Progress use the console as a context manager (special
    # methods are looked up on the type, not through __getattr__).
    def __enter__(self) -> Console:
        return self._get().__enter__()

    def __exit__(self, *exc: object) -> None:
        self._get().__exit__(*exc)


console = cast("Console", _LazyConsole(highlight=False))
err_console = cast("Console", _LazyConsole(stderr=True, highlight=False))

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
    "doctor": 9,  # a doctor check failed
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


_ERROR_KINDS = ("ConfigError", "IntegrityError", "TrustError", "SignatureError", "ProtocolError",
                "RemoteProtocolError", "SourceError", "MirrorError", "NoSourceError", "StorageError", "DiskFullError")


def _remote_error(line: dict[str, Any]) -> AutoglmError:
    """The running node's error, as the same class (so the exit code is the same as a local fetch's)."""
    from autoglm.node import errors

    kind = str(line.get("kind"))
    cls = getattr(errors, kind) if kind in _ERROR_KINDS else SourceError
    return cls(f"the running node could not fetch: {line.get('message')}")


def relay_control(
    data_dir: Path, request: dict[str, Any], sock: socket.socket | None, on_line: Callable[[dict[str, Any]], None],
    *, final: str, what: str,
) -> dict[str, Any]:
    """Send ``request`` to the running node; pass its progress lines to ``on_line`` until the ``final`` event.

    Returns the line whose ``event`` is ``final``. An ``error`` line is raised as
    the node's own error class; a connection that ends first is a SourceError
    (``what``: the operation, for that message).
    """
    from autoglm.node._control_client import request as control_request

    for line in control_request(data_dir, request, sock=sock):
        kind = line.get("event")
        if kind == final:
            return line
        if kind == "error":
            raise _remote_error(line)
        on_line(line)
    raise SourceError(f"the running node closed the connection before the {what} finished")


@contextmanager
def errors_reported(close: Callable[[], None], as_json: bool) -> Iterator[None]:
    """Run a command's work; ``close`` its progress view, then, with --json, say any error as a line before it propagates."""
    try:
        try:
            yield
        finally:
            close()
    except AutoglmError as exc:
        if as_json:
            print_json({"event": "error", "error": type(exc).__name__, "message": str(exc)})
        raise
