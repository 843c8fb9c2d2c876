"""systemd's readiness protocol (``sd_notify``), without libsystemd.

Under a ``Type=notify`` unit, systemd puts the path of a unix datagram socket
in ``NOTIFY_SOCKET`` and waits for ``READY=1`` on it before it calls the
service started (and before units ordered after it start). The protocol is one
datagram of newline-separated ``KEY=VALUE`` assignments (sd_notify(3)); a path
starting with ``@`` names a socket in the abstract namespace.

Without ``NOTIFY_SOCKET`` every call is a no-op, so ``join`` sends the same
messages whether or not it runs under systemd. A failure to send is logged,
never raised: readiness reporting must not take the node down.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["notify"]

log = logging.getLogger(__name__)


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock (vsock:CID:PORT) and others: not supported here


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``KEY=VALUE`` assignments to systemd, e.g. ``notify("READY=1", "STATUS=serving")``.

    Returns whether a datagram was sent (False without ``NOTIFY_SOCKET``).
    """
    env = os.environ if environ is None else environ
    target = env.get("NOTIFY_SOCKET", "")
    if not target:
        return False
    addr = _address(target)
    if addr is None:
        log.warning("NOTIFY_SOCKET=%r is not a unix socket path; readiness not reported", target)
        return False
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", target, exc)
        return False
    return True
