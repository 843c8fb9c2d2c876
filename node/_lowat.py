"""Fewer, larger socket reads on slow links: an adaptive ``SO_RCVLOWAT``.

A mirror that serves a node at a few MiB/s delivers its body in segments of
a few KiB. Read naively, every segment wakes the trio loop for one small
``recv_into``: thousands of wake-ups per second per connection, each costing
far more Python than the copy itself. ``SO_RCVLOWAT`` tells the kernel not to
report the socket readable (epoll) until that many bytes are queued, so one
wake-up moves a large block.

The low-water mark is set from the measured rate, about ``LATENCY`` seconds'
worth of bytes, between 16 KiB and 256 KiB, and never above what the caller
still expects to read (otherwise the last bytes of a body would never be
reported readable). A slow or stalled link falls back to the default of 1
byte, so stall detection sees bytes as they arrive.
"""

from __future__ import annotations

import socket

import trio

LATENCY = 0.025  # seconds of data one wake-up may wait for
MIN_LOWAT = 16 << 10
MAX_LOWAT = 256 << 10
_SO_RCVLOWAT = getattr(socket, "SO_RCVLOWAT", None)


class LowWater:
    """Per-connection state: the rate estimate and the low-water mark now set on the socket.

    ``max_lowat``: the highest mark (default MAX_LOWAT). ``carry_rate``: start
    each body at the rate the previous body on this connection ran at, instead
    of at mark 1 for its first 50 ms. The piece channel uses both (1 MiB,
    carried): its 8 MiB pieces follow each other on one connection at
    100+ MB/s, and re-learning the rate for every piece cost a burst of small
    reads per piece. A carried mark is ~LATENCY seconds of the old rate, so a
    link that slows down even a hundredfold still fills it long before the
    stall timeout.
    """

    __slots__ = ("_t0", "_bytes", "_set", "_ok", "_max", "_carry", "_prior")

    def __init__(self, *, max_lowat: int = MAX_LOWAT, carry_rate: bool = False) -> None:
        self._t0: float | None = None
        self._bytes = 0
        self._set = 1
        self._ok = _SO_RCVLOWAT is not None
        self._max = max_lowat
        self._carry = carry_rate
        self._prior = 0.0  # bytes/s of the last body (carry_rate only)

    def _rate(self) -> float | None:
        if self._t0 is None:
            return None
        dt = trio.current_time() - self._t0
        return self._bytes / dt if dt > 0.05 else None

    def _want(self, expect: int) -> int:
        rate = self._rate()
        if rate is None:
            rate = self._prior
        target = int(rate * LATENCY)
        if target < MIN_LOWAT:
            return 1
        return max(1, min(target, self._max, expect))

    async def recv_into(self, sock: trio.socket.SocketType, view: memoryview, expect: int) -> int:
        """``sock.recv_into(view)``, waking only once a worthwhile block is queued.

        ``expect``: bytes the caller is sure will still arrive on this socket
        (the rest of a body). Raises what ``recv_into`` raises.
        """
        if self._ok:
            want = self._want(min(expect, len(view)))
            if want != self._set:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, want)  # type: ignore[arg-type]
                    self._set = want
                except OSError:
                    self._ok = False
        n = await sock.recv_into(view)
        if self._t0 is None:
            self._t0 = trio.current_time()
        else:
            self._bytes += n
        return n

    def done(self, sock: trio.socket.SocketType) -> None:
        """The expected bytes all arrived: back to the default mark (1) and a fresh rate.

        Call before reading anything else on the socket (a response head, a
        frame header): those are small and a raised mark would never wake.
        """
        if self._carry:
            rate = self._rate()
            if rate is not None:
                self._prior = rate
        self._t0 = None
        self._bytes = 0
        if self._set != 1:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, 1)  # type: ignore[arg-type]
            except OSError:
                self._ok = False
            self._set = 1
