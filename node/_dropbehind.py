"""Drop-behind for uploads, a few seconds late: a piece stays cached for the next peer that asks.

The store drops every range it sent from the page cache (docs/fetch.md,
"Drop-behind"), and its direct-I/O writes never cache a piece at all, so
every upload read the piece from disk again. In a swarm a piece is asked for
by several peers within seconds of each other (the first copy spreads from
its owner), and those reads are most of a sender's system time: three
uploads of each 8 MiB piece in a row cost 0.36-0.45 CPU-s per GiB sent with
a drop after each, 0.25-0.27 with one drop after the last (this VM, loopback
TCP; docs/benchmarks.md).

:class:`RecentlyServed` holds the ranges sent last, each with a duplicate of
its file descriptor, and drops a range once ``keep_bytes`` were sent after it
or ``keep_s`` passed since its last upload (the peerwire server sweeps every
second). At most ``keep_bytes`` of uploads stay cached, for at most a few
seconds, and a removed file's blocks are held no longer than that.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

from autoglm.node._staging import drop_cache

__all__ = ["KEEP_BYTES", "KEEP_S", "RecentlyServed"]

KEEP_BYTES = 64 << 20  # eight 8 MiB pieces
KEEP_S = 5.0

_Key = tuple[int, int, int, int]  # st_dev, st_ino, offset, length


class RecentlyServed:
    """Ranges uploaded in the last ``keep_s`` seconds, up to ``keep_bytes``; thread-safe (the senders are threads)."""

    def __init__(self, keep_bytes: int = KEEP_BYTES, keep_s: float = KEEP_S) -> None:
        self.keep_bytes = keep_bytes
        self.keep_s = keep_s
        self._lock = threading.Lock()
        self._ranges: OrderedDict[_Key, tuple[int, float]] = OrderedDict()  # -> (our fd, last upload)
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._ranges)

    def sent(self, fd: int, offset: int, length: int, now: float | None = None) -> None:
        """``length`` bytes at ``offset`` of ``fd``'s file were just uploaded: keep them a while (``fd`` stays the caller's)."""
        if length <= 0:
            return
        if length > self.keep_bytes:
            drop_cache(fd, offset, length)
            return
        s = os.fstat(fd)
        key = (s.st_dev, s.st_ino, offset, length)
        mine = os.dup(fd)
        now = time.monotonic() if now is None else now
        with self._lock:
            old = self._ranges.pop(key, None)
            if old is not None:
                os.close(old[0])  # the range is kept once, under the newest fd
            else:
                self._bytes += length
            self._ranges[key] = (mine, now)
            while self._bytes > self.keep_bytes:
                self._drop_oldest()

    def expire(self, now: float | None = None) -> None:
        """Drop the ranges not uploaded for ``keep_s``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._ranges and next(iter(self._ranges.values()))[1] <= now - self.keep_s:
                self._drop_oldest()

    def clear(self) -> None:
        """Drop every range now (the server stops)."""
        with self._lock:
            while self._ranges:
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        (_, _, offset, length), (fd, _) = self._ranges.popitem(last=False)
        self._bytes -= length
        try:
            drop_cache(fd, offset, length)
        finally:
            os.close(fd)
