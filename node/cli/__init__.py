"""The ``autoglm-node`` command line. See docs/operations.md for exit codes."""

from ._main import main

__all__ = ["main"]
