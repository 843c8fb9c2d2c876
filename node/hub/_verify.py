"""Whole-file checks of hub files against their SHA-256 or git blob id, computed while the file arrives.

Strategy: a file's SHA-256 can only be computed in byte order, but pieces
arrive out of order over several connections. Each file has a
:class:`FileHash` whose cursor advances, in a worker thread, over the
pieces that have committed contiguously from the start (read back from the
staging file, still in the page cache: the download leaves committed
pieces cached and the verifier drops them once hashed), as
:class:`~autoglm.node._progress.PieceVerified` events arrive. When the engine finishes the file it calls :meth:`Verifier.check`
(the store's ``Download.file_check``), which hashes only what the cursor has
not reached yet. So the check costs no extra wall time at the end of a
download except for the last pieces, instead of a second pass over the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import trio

from autoglm.node._progress import Event, FetchStarted, FileDone, PieceVerified, ProgressSnapshot
from autoglm.node._store import Download, drop_cache
from autoglm.node.errors import IntegrityError

from ._api import HubFile

__all__ = ["FileHash", "Tap", "Verifier"]

READ = 8 << 20


class Tap(Protocol):
    """Sees a file's bytes in order, once, as the whole-file check reads them (``publish hf://`` hashes its pieces)."""

    def feed(self, offset: int, data: bytes) -> None: ...

    def reset(self) -> None: ...


class FileHash:
    """The hub identity of one file, hashed in byte order from a cursor. Thread-safe."""

    def __init__(self, f: HubFile, tap: Tap | None = None) -> None:
        self.file = f
        self.tap = tap
        if f.sha256 is not None:
            self._h: Any = hashlib.sha256()
            self.want, self.what = f.sha256, "SHA-256"
        else:
            self._h = hashlib.sha1(usedforsecurity=False)
            self._h.update(b"blob %d\0" % f.size)
            self.want, self.what = f.blob_id or "", "git blob id"
        self.pos = 0
        self.lock = threading.Lock()
        self.closed = False

    def feed(self, offset: int, data: bytes) -> None:
        """Bytes at ``offset``; ignored unless they continue exactly at the cursor (hold ``lock``)."""
        if offset == self.pos and not self.closed:
            self._h.update(data)
            if self.tap is not None:
                self.tap.feed(offset, data)
            self.pos += len(data)

    def finish(self, fd: int) -> None:
        """Hash the rest from ``fd`` and compare; IntegrityError on a mismatch. The hash is then spent."""
        with self.lock:
            h = self._h if not self.closed else None
            pos = self.pos if h is not None else 0
            if h is None:  # checked before (a rerun of the same file): start over
                self.__init__(self.file, self.tap)  # type: ignore[misc]
                if self.tap is not None:
                    self.tap.reset()
                h, pos = self._h, 0
            while pos < self.file.size:
                chunk = os.pread(fd, min(READ, self.file.size - pos), pos)
                if not chunk:
                    break
                h.update(chunk)
                if self.tap is not None:
                    self.tap.feed(pos, chunk)
                pos += len(chunk)
            ok = pos == self.file.size and h.hexdigest() == self.want
            self.closed = True
        drop_cache(fd, 0, self.file.size)
        if not ok:
            raise IntegrityError(f"{self.file.path}: the bytes do not match the hub's {self.what} {self.want[:16]}…; "
                                 "the file's pieces were discarded")


class Verifier:
    """One per hub fetch: a :class:`FileHash` per manifest file, fed from the engine's events."""

    def __init__(self, download: Download, files: Sequence[HubFile], taps: Mapping[str, Tap] | None = None) -> None:
        self.download = download
        self.hashes = [FileHash(f, (taps or {}).get(f.path)) for f in files]
        self._done: set[int] = set(download.done)
        self._busy: set[int] = set()

    def check(self, fi: int, fd: int) -> None:
        """``Download.file_check``: the whole file against its hub identity."""
        self.hashes[fi].finish(fd)

    def _advance(self, fi: int) -> None:
        """Worker thread: move the file's cursor over committed pieces, in order."""
        fh = self.hashes[fi]
        d = self.download
        first = d.file_starts[fi]
        for i in range(first, first + len(d.manifest.files[fi].pieces)):
            p = d.pieces[i]
            if p.end <= fh.pos:
                continue
            if i not in self._done or p.offset != fh.pos:
                return
            with fh.lock:
                if fh.closed or fh.pos != p.offset:
                    return
                try:
                    data = d.read(i)
                except OSError:  # moved into place meanwhile: check() does the rest
                    return
                if len(data) != p.length:
                    return
                fh.feed(p.offset, data)
            d.uncache(i)  # hashed: its pages can go (the engine left them for us)

    async def relay(
        self, recv: trio.MemoryReceiveChannel[Event], send: trio.MemorySendChannel[Event] | None, names: dict[str, str] | None = None
    ) -> None:
        """Pass the engine's events on; start hashing where a piece completed a run from the cursor.

        ``names`` renames files for the reader (``blobs/<sha256>`` -> the repository path).
        """
        async with trio.open_nursery() as nursery:
            async for ev in recv:
                if names:
                    ev = _renamed(ev, names)
                if isinstance(ev, PieceVerified):
                    self._done.add(ev.index)
                    fi = self.download.file_of[ev.index]
                    if fi not in self._busy and not self.hashes[fi].closed:
                        self._busy.add(fi)
                        nursery.start_soon(self._run_advance, fi)
                if send is not None:
                    try:
                        await send.send(ev)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        send = None

    async def _run_advance(self, fi: int) -> None:
        fh = self.hashes[fi]
        try:
            while True:  # pieces that committed while this ran are picked up by the next round
                before = fh.pos
                await trio.to_thread.run_sync(self._advance, fi)
                if fh.pos == before:
                    return
        finally:
            self._busy.discard(fi)


def _renamed(ev: Event, names: dict[str, str]) -> Event:
    if isinstance(ev, FetchStarted):
        return dataclasses.replace(ev, files=tuple((names.get(p, p), n) for p, n in ev.files))
    if isinstance(ev, FileDone):
        return dataclasses.replace(ev, path=names.get(ev.path, ev.path))
    if isinstance(ev, ProgressSnapshot):
        return dataclasses.replace(ev, by_file={names.get(p, p): n for p, n in ev.by_file.items()})
    return ev
