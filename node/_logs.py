"""The level py-libp2p logs at, kept across ``import libp2p``.

Importing libp2p runs its ``setup_logging()``: unless ``LIBP2P_DEBUG`` is set,
the ``libp2p`` logger gets level WARNING, no handler and no propagation, so
its warnings ("Failed to read DHT message from stream: ...", one per closed
DHT stream) reach stderr bare through logging's last-resort handler and
ignore the level the CLI chose. The CLI records its choice here, before
libp2p is imported; node/_p2p.py applies it again right after the import.
"""

from __future__ import annotations

import logging
import os

__all__ = ["apply_libp2p_level", "set_libp2p_level"]

_NOISY = ("libp2p", "multiaddr", "async_service")
_level = logging.CRITICAL


def set_libp2p_level(level: int) -> None:
    """Log py-libp2p (and its helpers) at ``level`` through the root handlers."""
    global _level
    _level = level
    for name in _NOISY:
        logging.getLogger(name).setLevel(level)
    apply_libp2p_level()


def apply_libp2p_level() -> None:
    """Undo what ``import libp2p`` did to its logger (LIBP2P_DEBUG keeps libp2p's own setup)."""
    if os.environ.get("LIBP2P_DEBUG"):
        return
    lg = logging.getLogger("libp2p")
    lg.setLevel(_level)
    lg.propagate = True
    # Some modules set their own level at import (network.auto_connector: INFO).
    for name, child in list(logging.root.manager.loggerDict.items()):
        if name.startswith("libp2p.") and isinstance(child, logging.Logger) and child.level != logging.NOTSET:
            child.setLevel(_level)
