"""Streaming order for the picker (rule 6): the head of each file first, for a reader that waits on it.

Theory of operation (after libtorrent's sequential download and time-critical pieces)
-------------------------------------------------------------------------------------
A gateway streams a file to its client as the unbroken run of verified
pieces from the file's start grows, so a piece past a hole is worth nothing
to the client until the hole is filled. With a ``window`` (bytes), each
streamed file has a *cursor*, its first piece that is not DONE (not wanted
pieces count as done), and a *readahead window*: the pieces from the cursor
on whose start lies less than ``window`` bytes past the cursor's start.

* Peers: a pick first takes the pickable pieces of the windows, nearest to
  its file's cursor first (so several streamed files advance together),
  ties by index; only when the windows hold nothing this source may send
  does rarest first (rule 2) choose. Pieces past the windows keep rarest
  first, so the swarm still spreads its copies.
* Mirrors: the start order of mirror runs (protocol/_runs.py) becomes small
  pieces first, then blocks of a quarter window of each file from the
  front, the first-copy rank order only inside a block (so nodes that start before
  they know of each other still begin with different pieces, the ones each
  will likely own). Which pieces a mirror may take is unchanged
  (first-copy ownership, protocol/_ownership.py, and the overlap budget):
  the mirror still fetches only this node's share, now from the front.

Without a window (``None``) the picker behaves exactly as before.
Pure: no IO, no clock; cursors only move forward, each piece is stepped
over once, so a pick costs the pieces of the windows, not of the files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

__all__ = ["StreamOrder"]

_SMALL_PIECE = 1 << 20  # pieces below this (small files) go first in a mirror's order, as in protocol/_ownership.py


class StreamOrder:
    """Cursors and readahead windows of the streamed files of one fetch (see the module docstring)."""

    def __init__(self, sizes: Sequence[int], file_starts: Iterable[int], window: int) -> None:
        if window < 1:
            raise ValueError(f"stream window must be at least 1 byte, not {window}")
        self._sizes = sizes
        self.window = window
        n = len(sizes)
        starts = sorted({s for s in file_starts if 0 <= s < n} | ({0} if n else set()))
        ends = [*starts[1:], n]
        # [cursor, end) of every file that still has pieces ahead of its cursor
        self._files = [[s, e] for s, e in zip(starts, ends, strict=True) if s < e]
        self._offset = [0] * n  # bytes from the file's start
        for s, e in self._files:
            off = 0
            for i in range(s, e):
                self._offset[i] = off
                off += sizes[i]

    def mirror_order(self, base: Sequence[int]) -> list[int]:
        """Every piece in the order mirror runs start from: small pieces, then each file block by block.

        A block is a quarter of the window (at least a byte). Inside a block
        pieces keep their ``base`` order, the first-copy rank order: nodes
        that start before they know of each other then begin with different
        pieces, as without streaming, instead of all with the first one.
        """
        block = max(self.window // 4, 1)
        pos = [0] * len(self._sizes)
        for k, i in enumerate(base):
            pos[i] = k
        return sorted(range(len(self._sizes)),
                      key=lambda i: (self._sizes[i] >= _SMALL_PIECE, self._offset[i] // block, pos[i]))

    def windows(self, done: Callable[[int], bool]) -> list[int]:
        """The pieces of every window, nearest to their file's cursor first, ties by index.

        ``done``: the piece needs nothing (DONE, or not wanted); cursors step over such pieces for good.
        """
        out: list[tuple[int, int]] = []
        keep: list[list[int]] = []
        for f in self._files:
            cur, end = f
            while cur < end and done(cur):
                cur += 1
            f[0] = cur
            if cur == end:
                continue
            keep.append(f)
            base = self._offset[cur]
            i = cur
            while i < end and self._offset[i] - base < self.window:
                out.append((self._offset[i] - base, i))
                i += 1
        self._files = keep
        out.sort()
        return [i for _, i in out]

    def pick(self, done: Callable[[int], bool], pickable: Callable[[int], bool], max_bytes: int) -> list[int]:
        """Pickable window pieces up to ``max_bytes`` (at least one when there is any), in :meth:`windows` order."""
        picked: list[int] = []
        total = 0
        for i in self.windows(done):
            if not pickable(i):
                continue
            if picked and total + self._sizes[i] > max_bytes:
                break
            picked.append(i)
            total += self._sizes[i]
            if total >= max_bytes:
                break
        return picked

    def cursors(self) -> list[int]:
        """Each streamed file's first piece not yet done, as of the last :meth:`windows` (for tests and status)."""
        return [f[0] for f in self._files]
