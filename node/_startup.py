"""The garbage collector during start-up.

Strategy: starting ``join`` imports about 1,300 modules (py-libp2p alone pulls
in ~1,000) and creates a few hundred thousand long-lived objects: classes,
functions, dataclass machinery. CPython's cyclic collector runs a pass every
700 net allocations and a full pass whenever the young generations have grown
by a quarter of the old one, so during start-up it walks the same, ever
growing, set of permanent objects over and over and frees almost nothing:
measured at ~0.2 CPU-s of the ~1.1 CPU-s a cold ``join`` needed to print
``ready`` (docs/benchmarks.md, "Cold start").

The command line turns the collector off before it imports anything heavy
(:func:`pause`) and on again once the command has started (:func:`resume`):
``join`` once it listens, every other command before it runs. ``resume``
first moves every object alive at that point into the permanent generation
(``gc.freeze``), so later full collections skip the start-up objects too.
The library API never calls these: only the ``autoglm-node`` process does.

:func:`skip_unused_imports` (the same process, before any import) marks one
module absent that an import pulls in for nothing: httpx's ``__init__``
imports its own command-line client, and with it click, rich's console and
pygments (~80 modules, ~0.07 CPU-s of a cold ``join``), inside a ``try``
that falls back when the import fails. py-libp2p imports httpx (AutoTLS);
nothing in this process runs httpx's command line.
"""

from __future__ import annotations

import gc
import sys

__all__ = ["pause", "resume", "skip_unused_imports"]

#: Modules that importers treat as optional and that the node never uses.
_UNUSED = ("httpx._main",)

_paused = False


def pause() -> None:
    """Turn the cyclic collector off for the start-up (the CLI entry point only)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """Freeze what start-up allocated and turn the collector back on; a no-op unless :func:`pause` turned it off."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()


def skip_unused_imports() -> None:
    """Make :data:`_UNUSED` fail to import (``None`` in ``sys.modules``); the CLI entry point only."""
    for name in _UNUSED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
