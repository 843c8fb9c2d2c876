"""Two per-frame costs of py-libp2p 0.8.1's connection plumbing, cut (applied once by node/_p2p.py).

Profiles of one node in an 8-node swarm (docs/benchmarks.md, "Cost per
node") put yamux and Noise at 30-40 % of the event loop's samples, for a few
thousand small control messages per GiB. Two things multiplied them:

1. **A window update for every read.** py-libp2p's ``YamuxStream`` gives the
   sender its receive window back after *every* read (``bytes_read`` and
   "partial slack" credit), so each Have or Claim a peer reads costs a second
   frame the other way: its own Noise record, ``send`` and, on the sender, a
   wake-up of the connection's reader, a decrypt and the window lock.
   go-yamux (and the yamux spec's flow control) returns credit only once at
   least half the window is unreleased; a sender then never waits while the
   reader keeps up, and a stream of small messages costs no updates at all
   until half a window (128 KiB here) was read. Updates are ordinary yamux
   frames: peers see fewer of them, nothing else changes on the wire.
2. **Two socket reads per Noise record.** Noise records are read as a 2-byte
   length and then the body, each through ``TrioTCPStream.read`` and so a
   ``recv`` and a trio checkpoint each. The connection now reads up to 64 KiB
   at once and serves the following reads from what it already holds (in
   order, under the stream's read lock), so a record, and often several,
   costs one ``recv``.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.stream_muxer.yamux.yamux import YamuxStream

__all__ = ["READ_AHEAD", "apply"]

READ_AHEAD = 64 * 1024  # bytes asked of the socket per read of a libp2p TCP connection

_applied = False
_grant_credit = YamuxStream._auto_tune_and_send_window_update


async def _credit_in_halves(self: Any, *, bytes_read: int = 0) -> None:
    """Give window credit back only once half the receive window is unreleased (go-yamux's rule)."""
    buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
    unreleased = self.target_recv_window - (self.recv_window + buffered)
    if unreleased <= 0 or unreleased < self._grow_threshold():
        return
    await _grant_credit(self, bytes_read=bytes_read)


async def _read_ahead(self: Any, n: int | None = None) -> bytes:
    """Up to ``n`` bytes: from what an earlier read took ahead, else one ``recv`` of up to READ_AHEAD."""
    if n == 0:
        return b""
    async with self.read_lock:
        held: bytes = getattr(self, "_ahead", b"")
        if held:
            pos: int = self._ahead_pos
            end = len(held) if n is None else min(len(held), pos + n)
            if end == len(held):
                self._ahead = b""
            else:
                self._ahead_pos = end
            return held[pos:end] if pos or end < len(held) else held
        try:
            data: bytes = await self.stream.receive_some(max(n or 0, READ_AHEAD))
        except trio.BrokenResourceError as exc:
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {exc}", transport="tcp") from exc
        except trio.ClosedResourceError:
            return b""  # closed here: end of stream for the layers above (as py-libp2p does)
        if n is not None and len(data) > n:
            self._ahead, self._ahead_pos = data, n
            return data[:n]
        return data


def apply() -> None:
    """Install both changes (idempotent; process-wide, as py-libp2p's classes are)."""
    global _applied
    if _applied:
        return
    YamuxStream._auto_tune_and_send_window_update = _credit_in_halves  # type: ignore[method-assign]
    TrioTCPStream.read = _read_ahead  # type: ignore[method-assign]
    _applied = True
