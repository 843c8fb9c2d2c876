"""Client side of the local control API (node/_control_api.py): blocking, standard library only.

The commands that talk to a running `join` node (``fetch`` handed over,
``status``, ``name-publish``) use this. It needs no event loop and imports
nothing heavy, so ``autoglm-node fetch`` handed to a running node starts in
about 50 ms of CPU instead of the ~350 ms that trio, the engine and
cryptography cost; on a small host where eight fetches start at once that
is over a second before the first request reaches the swarm.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from autoglm.node.errors import ProtocolError, SourceError

__all__ = ["SOCKET_NAME", "connect", "request", "socket_path"]

SOCKET_NAME = "control.sock"
#: A reply line longer than this is refused (the node's own lines are a few KiB).
MAX_LINE = 1 << 20


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


def connect(data_dir: Path) -> socket.socket | None:
    """A connection to the node running on ``data_dir``, or None when none answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(socket_path(data_dir)))
    except OSError:
        sock.close()
        return None
    return sock


def request(
    data_dir: Path, value: dict[str, Any], *, timeout: float | None = None, sock: socket.socket | None = None
) -> Iterator[dict[str, Any]]:
    """Send one request; yield the node's reply lines as they come.

    ``timeout`` bounds the whole exchange (None: as long as the node keeps
    the connection open, as a fetch does). ``sock`` is a connection from
    :func:`connect`; the generator owns and closes it. SourceError when no
    node runs on ``data_dir`` or the exchange times out; ProtocolError for a
    reply that is not JSON lines.
    """
    if sock is None:
        sock = connect(data_dir)
        if sock is None:
            raise SourceError(f"no running node at {socket_path(data_dir)} (start one with `autoglm-node join`)")
    deadline = None if timeout is None else time.monotonic() + timeout
    with closing(sock):
        try:
            sock.settimeout(timeout)
            sock.sendall(json.dumps(value, sort_keys=True).encode() + b"\n")
            buf = bytearray()
            while True:
                end = buf.find(b"\n")
                while end >= 0:
                    line = bytes(buf[:end])
                    del buf[: end + 1]
                    try:
                        reply = json.loads(line)
                    except ValueError as exc:
                        raise ProtocolError(f"the node sent a line that is not JSON: {line[:80]!r}") from exc
                    if not isinstance(reply, dict):
                        raise ProtocolError(f"the node sent a line that is not a JSON object: {line[:80]!r}")
                    yield reply
                    end = buf.find(b"\n")
                if len(buf) > MAX_LINE:
                    raise ProtocolError(f"the node sent a line over {MAX_LINE} bytes")
                if deadline is not None:
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
        except TimeoutError as exc:
            raise SourceError(f"the node at {socket_path(data_dir)} did not answer {value.get('op')!r} in {timeout} s") from exc
        except OSError as exc:
            raise SourceError(f"the control connection to {socket_path(data_dir)} failed: {exc}") from exc
