"""Piece delivery and group commit: how a fetch's bytes reach the store.

A source hands its bytes to a :class:`Sink` (the engine's
:class:`~autoglm.node._sources.PieceSink`); each piece gets a writer.

Writers: the first source to open a piece streams it straight into the staging
file; an endgame duplicate of the same piece buffers in memory and writes only
after its own hash matched. Once a piece is verified, any other writer of it
becomes a no-op, and a buffered winner waits for the direct writer's pwrite in
flight (big blocks are hashed and written in worker threads) before writing its
own bytes, so unverified bytes never land on verified ones.

The committer (:meth:`Delivery.run_committer`): pieces whose hash matched are
queued; it fdatasyncs and records the whole queue in one transaction in a
worker thread, then marks them DONE and publishes ``PieceVerified``. Pieces
written while a commit runs go in the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Sequence

import blake3
import trio

from autoglm.node._fetchstats import FetchStats
from autoglm.node._progress import Event, FileDone, PieceVerified
from autoglm.node._sources import PieceRef
from autoglm.node._store import UNKNOWN_HASH, Download, FileCheckFailed
from autoglm.node.errors import IntegrityError, SourceError, StorageError
from autoglm.protocol._picker import PiecePicker, PieceState

__all__ = ["THREAD_MIN", "Delivery", "PieceHashMismatch", "Sink"]

THREAD_MIN = 128 << 10  # chunks at least this big are hashed and written in a worker thread

log = logging.getLogger("autoglm.node._engine")  # the engine's parts log as the engine


class PieceHashMismatch(IntegrityError):
    """A piece's bytes failed its hash: the source is never asked for ``piece_index`` again."""

    def __init__(self, message: str, piece_index: int) -> None:
        super().__init__(message)
        self.piece_index = piece_index


class _NullWriter:
    """A writer for a piece already verified: counts the bytes, keeps none."""

    def __init__(self, delivery: Delivery, source_id: str = "") -> None:
        self._stats = delivery.stats
        self._sid = source_id

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self._stats.handed(self._sid, len(chunk))

    async def finish(self) -> None:
        return None

    def abort(self) -> None:
        return None


class _Writer:
    """Streams one piece. ``direct``: into the staging file; else buffered until verified."""

    def __init__(self, delivery: Delivery, source_id: str, index: int, direct: bool) -> None:
        self._dv = delivery
        self._sid = source_id
        self.index = index
        self.direct = direct
        self.dead = False
        self._h = blake3.blake3()
        self.offset = 0  # bytes of the piece received so far
        self._buf = bytearray() if not direct else None
        self._idle: trio.Event | None = None
        self.resumed = False
        delivery.writers.setdefault(index, []).append(self)

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self._dv.stats.handed(self._sid, len(chunk))
        if self.dead:
            return
        if self._buf is not None:
            self._h.update(chunk)
            self._buf += chunk
        elif len(chunk) >= THREAD_MIN:
            self._idle = trio.Event()
            try:
                await trio.to_thread.run_sync(self._write_sync, chunk, self.offset)
            finally:
                self._idle.set()
                self._idle = None
        else:
            self._write_sync(chunk, self.offset)
        self.offset += len(chunk)

    def resume(self, prefix: bytes) -> None:
        """Start after bytes already in the staging file (unverified until finish)."""
        self._h.update(prefix)
        if self._buf is not None:
            self._buf += prefix
        self.offset = len(prefix)
        self.resumed = True

    def _write_sync(self, chunk: bytes | bytearray | memoryview, off: int) -> None:
        self._h.update(chunk)
        self._dv.download.write(self.index, off, chunk)

    async def wait_idle(self) -> None:
        if self._idle is not None:
            await self._idle.wait()

    def _detach(self) -> None:
        ws = self._dv.writers.get(self.index, [])
        if self in ws:
            ws.remove(self)
        if not ws:
            self._dv.writers.pop(self.index, None)

    async def finish(self) -> None:
        self._detach()
        if self.dead:
            return
        dv = self._dv
        p = dv.download.pieces[self.index]
        digest = self._h.digest()
        # An unknown hash (hub files) is learned here; the whole file is checked before it is final.
        if self.offset != p.length or (p.hash != UNKNOWN_HASH and digest != p.hash):
            dv.stats.discarded += self.offset
            if self.resumed:
                # The bytes kept from before the crash may be the bad part: fetch it whole, blame no one.
                dv.download.partial.pop(self.index, None)
                raise SourceError(f"piece {self.index} did not verify after resuming mid-piece; fetching it whole")
            raise PieceHashMismatch(
                f"piece {self.index} ({dv.refs[self.index].path} at byte {p.offset}) from {self._sid} failed its hash check",
                self.index,
            )
        if dv.picker.state(self.index) in (PieceState.WRITING, PieceState.DONE):
            dv.stats.discarded += self.offset
            return
        others = dv.writers.pop(self.index, [])
        for w in others:
            w.dead = True
        dv.finalizing.add(self.index)
        try:
            if self._buf is not None:
                await self._write_buffered(others)
        finally:
            dv.finalizing.discard(self.index)
        if dv.picker.state(self.index) not in (PieceState.WRITING, PieceState.DONE):
            if p.hash == UNKNOWN_HASH:
                dv.download.learned[self.index] = digest
            dv.piece_written(self._sid, self.index)

    async def _write_buffered(self, others: list[_Writer]) -> None:
        dv = self._dv
        assert self._buf is not None
        # A direct writer of this piece may have a pwrite in a worker thread:
        # let it land before ours, so the verified bytes are the last written.
        for w in others:
            await w.wait_idle()
        if dv.picker.state(self.index) not in (PieceState.WRITING, PieceState.DONE):
            await trio.to_thread.run_sync(dv.download.write, self.index, 0, self._buf)

    def abort(self) -> None:
        self._detach()
        self._dv.stats.discarded += self.offset
        self.dead = True


class Sink:
    """The :class:`~autoglm.node._sources.PieceSink` one request of one source writes into."""

    def __init__(self, delivery: Delivery, source_id: str) -> None:
        self._dv = delivery
        self._sid = source_id
        self.taken: list[int] = []  # pieces taken on beyond the request (whole-file bodies)

    def open_piece(self, index: int, skip: int = 0) -> _Writer | _NullWriter:
        dv = self._dv
        if dv.picker.state(index) in (PieceState.WRITING, PieceState.DONE) or index in dv.finalizing:
            return _NullWriter(dv, self._sid)
        if dv.draining:  # pieces in flight finish; none starts
            raise SourceError(f"piece {index} not started: the fetch is stopping")
        direct = not any(w.direct and not w.dead for w in dv.writers.get(index, []))
        w = _Writer(dv, self._sid, index, direct)
        if skip:
            if dv.download.partial.get(index) != skip:
                w.abort()
                raise SourceError(f"piece {index}: cannot resume at byte {skip}")
            w.resume(dv.download.read_range(index, 0, skip))
        return w

    async def put(self, index: int, data: bytes | bytearray | memoryview) -> None:
        w = self.open_piece(index)
        await w.write(data)
        await w.finish()

    def take(self, index: int) -> bool:
        picker = self._dv.picker
        if not picker.has_source(self._sid):
            return False
        if picker.take(self._sid, index, trio.current_time()):
            self.taken.append(index)
            return True
        return False

    def file_pieces(self, path: str) -> Sequence[PieceRef]:
        return self._dv.file_refs[path]

    def wake(self) -> None:
        self._dv.wake()


class Delivery:
    """Writers of pieces in flight, the queue of written pieces, and the committer.

    ``on_written(source_id, index, others)`` hears each piece whose hash
    matched (``others``: the sources whose duplicate requests lost the race);
    ``send`` publishes ``PieceVerified``/``FileDone``; ``wake`` wakes the
    engine's loop.
    """

    def __init__(
        self,
        download: Download,
        picker: PiecePicker,
        refs: Sequence[PieceRef],
        stats: FetchStats,
        *,
        send: Callable[[Event], Awaitable[None]],
        wake: Callable[[], None],
        on_written: Callable[[str, int, Collection[str]], None],
        commit_interval: float,
    ) -> None:
        self.download = download
        self.picker = picker
        self.refs = refs
        self.file_refs: dict[str, list[PieceRef]] = {}
        for ref in refs:
            self.file_refs.setdefault(ref.path, []).append(ref)
        self.stats = stats
        self.wake = wake
        self._send = send
        self._on_written = on_written
        self._commit_interval = commit_interval
        self.writers: dict[int, list[_Writer]] = {}
        self.finalizing: set[int] = set()
        self._pending: dict[int, str] = {}
        self._committing: dict[int, str] = {}  # the batch in the commit thread
        self._commit_ev = trio.Event()
        self._file_sources: dict[int, set[str]] = {}  # file index -> sources that delivered its pieces
        #: Stopping: pieces with bytes arriving finish, no other piece is opened (see Fetch.drain).
        self.draining = False

    def sink(self, source_id: str) -> Sink:
        return Sink(self, source_id)

    @property
    def idle(self) -> bool:
        """No piece is being written, queued for a commit or committing."""
        return not self.writers and not self.finalizing and not self._pending and not self._committing

    @property
    def has_pending(self) -> bool:
        """Pieces written and not yet handed to a commit."""
        return bool(self._pending)

    def written(self, index: int) -> int:
        """Bytes of piece ``index`` the furthest live writer has received."""
        return max((w.offset for w in self.writers.get(index, []) if not w.dead), default=0)

    def piece_written(self, source_id: str, index: int) -> None:
        """Piece ``index`` from ``source_id`` matched its hash and is in the staging file: queue its commit."""
        others = self.picker.piece_written(source_id, index, now=trio.current_time())
        self._file_sources.setdefault(self.download.file_of[index], set()).add(source_id)
        self.download.partial.pop(index, None)
        self._pending[index] = source_id
        self._commit_ev.set()
        self._on_written(source_id, index, others)

    def in_flight_by_file(self) -> dict[str, int]:
        """Bytes of pieces not yet committed, per file: written and queued, or streaming now.

        A display counts them so large pieces move the bar as bytes arrive. An
        endgame duplicate counts once (the furthest writer of a piece).
        """
        out: dict[str, int] = {}
        queued = {**self._pending, **self._committing}
        for i in queued:
            ref = self.refs[i]
            out[ref.path] = out.get(ref.path, 0) + ref.length
        for i in self.writers:
            if i in queued:
                continue
            n = self.written(i)
            if n:
                ref = self.refs[i]
                out[ref.path] = out.get(ref.path, 0) + n
        return out

    async def run_committer(self) -> None:
        last = -float("inf")
        while True:
            await self._commit_ev.wait()
            # Group commit: at most one fdatasync per commit_interval, so the disk
            # writes big batches. Kill safety does not depend on it: recover()
            # re-hashes pieces that were written but not yet recorded.
            if self._pending and not self.picker.remaining <= len(self._pending):
                await trio.sleep_until(last + self._commit_interval)
            last = trio.current_time()
            self._commit_ev = trio.Event()
            batch, self._pending = self._pending, {}
            if not batch:
                continue
            self._committing = batch
            await self._commit(batch)
            self.wake()

    async def _commit(self, batch: dict[int, str]) -> None:
        try:
            finished = await trio.to_thread.run_sync(self.download.commit, list(batch))
        except StorageError:
            for i in batch:
                self.picker.piece_lost(i)
            raise
        except IntegrityError as exc:  # a whole-file check failed (its pieces are discarded)
            srcs = sorted(self._file_sources.get(exc.file_index, ())) if isinstance(exc, FileCheckFailed) else []
            raise IntegrityError(f"{exc}; its bytes came from {', '.join(srcs) or 'an earlier run'}") from exc
        if log.isEnabledFor(logging.DEBUG):
            log.debug("committed %d piece(s), %d left: %s", len(batch), self.picker.remaining - len(batch),
                      ", ".join(f"{i} from {sid}" for i, sid in batch.items()))
        self._committing = {}  # (a failed commit ends the fetch: nothing to reset then)
        for i, sid in batch.items():
            self.picker.piece_done(i)
            n = self.stats.verified(sid, i)
            await self._send(PieceVerified(self.download.manifest_id, i, sid, n, self.refs[i].path))
        for fi in finished:
            f = self.download.manifest.files[fi]
            await self._send(FileDone(f.path, f.size))
