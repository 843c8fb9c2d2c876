"""The fetch engine: the picker decides, sources do the IO, the store commits.

Theory of operation
-------------------
One :class:`Fetch` assembles one :class:`~autoglm.node._store.Download`.
``run`` opens a nursery with three kinds of task:

* the *loop* (``run`` itself): wakes when something changed, asks the pure
  :class:`~autoglm.protocol._picker.PiecePicker` for work for every source that
  has spare capacity and is out of backoff, and starts one *request task* per
  pick. It never awaits IO while deciding.
* *request tasks*: ``await source.fetch(request, sink)``; on return or failure
  they update the picker and wake the loop. Failures are isolated per request.
* the *committer*: group commit. Pieces whose hash matched are queued; the
  committer fdatasyncs and records the whole queue in one transaction in a
  worker thread, then marks them DONE and publishes ``PieceVerified``. Pieces
  written while a commit runs go in the next one.

Writers: the first source to open a piece streams it straight into the staging
file; an endgame duplicate of the same piece buffers in memory and writes only
after its own hash matched. Once a piece is verified, any other writer of it
becomes a no-op, and a buffered winner waits for the direct writer's pwrite in
flight (big blocks are hashed and written in worker threads) before writing its
own bytes, so unverified bytes never land on verified ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import blake3
import trio

from autoglm.node._http import PermanentMirrorError
from autoglm.node._progress import (
    Event,
    FetchDone,
    FetchStarted,
    FileDone,
    PieceVerified,
    ProgressSnapshot,
    SourceFailed,
)
from autoglm.node._sources import FetchRequest, PieceRef, Source, SourceKind
from autoglm.node._store import (
    UNKNOWN_HASH,
    Download,
    FileCheckFailed,
    PieceLocation,
    Store,
    _pread,
    preflight,
)
from autoglm.node.errors import (
    AutoglmError,
    IntegrityError,
    NoSourceError,
    SourceError,
    StorageError,
)
from autoglm.protocol._picker import PiecePicker, PieceState
from autoglm.protocol._slowsource import SlowSources

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from autoglm.node._mirrors import MirrorScore

__all__ = ["LOCAL_ID", "Fetch", "FetchOptions", "FetchResult", "collapse_group"]

LOCAL_ID = "local:store"
# A mirror that refuses every connection and never answered: give up after this
# many failed tries spread over at least REFUSED_SPAN seconds (instead of the
# max_consecutive_failures with backoff, ~30 s, that fit flaky mirrors).
REFUSED_TRIES = 3
REFUSED_SPAN = 1.0
THREAD_MIN = 128 << 10  # chunks at least this big are hashed and written in a worker thread

log = logging.getLogger(__name__)


class PieceHashMismatch(IntegrityError):
    """A piece's bytes failed its hash: the source is never asked for ``piece_index`` again."""

    def __init__(self, message: str, piece_index: int) -> None:
        super().__init__(message)
        self.piece_index = piece_index


@runtime_checkable
class _Scored(Protocol):
    """A source ranked among those of its kind by a score (mirrors)."""

    @property
    def score(self) -> MirrorScore: ...


@runtime_checkable
class _Counting(Protocol):
    """A source that counts the body bytes it received, used or not (mirrors, peers)."""

    @property
    def bytes_received(self) -> int: ...


@dataclass(frozen=True, slots=True)
class FetchOptions:
    endgame_copies: int = 2
    endgame_delay: float = 0.0  # an endgame duplicate waits for the first request to be this old
    mirror_overlap_budget: int | None = None
    check_space: bool = True
    space_margin: int | None = None
    local_copies: bool = True
    max_consecutive_failures: int = 8
    wait_for_sources: bool = False  # True: keep waiting when no source can serve (the swarm)
    progress_interval: float = 0.5
    check_sha256: bool = False  # re-read each finished file and check its SHA-256 too
    commit_interval: float = 0.05  # at most one group commit (fdatasync + one transaction) per interval
    swarm_id: str | None = None  # this node's peer id: spread the first copy over the swarm (picker rule 6)
    owner_timeout: float = 20.0  # a piece's owner silent this long: its pieces may come from a mirror here
    # Mirror connections the whole swarm should hold: each of n fetching nodes
    # opens at most max(2, ceil(this / n)) per mirror. Extra connections only
    # help against a per-connection limit; against an aggregate cap they just
    # split it finer, into more, smaller socket reads on every node.
    swarm_mirror_connections: int = 16


@dataclass(frozen=True, slots=True)
class FetchResult:
    manifest_id: bytes
    out_dir: str
    bytes_total: int
    bytes_by_source: dict[str, int]
    seconds: float
    refetched_bytes: int
    # Body bytes each source actually sent us, used or not (endgame duplicates,
    # cancelled runs, failed hashes): what the source's own log shows.
    received_by_source: dict[str, int] = field(default_factory=dict)


class _NullWriter:
    def __init__(self, fetch: Fetch, source_id: str = "") -> None:
        self._fetch = fetch
        self._sid = source_id

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self._fetch._received += len(chunk)
        self._fetch._handed[self._sid] = self._fetch._handed.get(self._sid, 0) + len(chunk)

    async def finish(self) -> None:
        return None

    def abort(self) -> None:
        return None


class _Writer:
    """Streams one piece. ``direct``: into the staging file; else buffered until verified."""

    def __init__(self, fetch: Fetch, source_id: str, index: int, direct: bool) -> None:
        self._f = fetch
        self._sid = source_id
        self.index = index
        self.direct = direct
        self.dead = False
        self._h = blake3.blake3()
        self._off = 0
        self._buf = bytearray() if not direct else None
        self._idle: trio.Event | None = None
        self.resumed = False
        fetch._writers.setdefault(index, []).append(self)

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self._f._received += len(chunk)
        self._f._handed[self._sid] = self._f._handed.get(self._sid, 0) + len(chunk)
        if self.dead:
            return
        if self._buf is not None:
            self._h.update(chunk)
            self._buf += chunk
        elif len(chunk) >= THREAD_MIN:
            self._idle = trio.Event()
            try:
                await trio.to_thread.run_sync(self._write_sync, chunk, self._off)
            finally:
                self._idle.set()
                self._idle = None
        else:
            self._write_sync(chunk, self._off)
        self._off += len(chunk)

    def resume(self, prefix: bytes) -> None:
        """Start after bytes already in the staging file (unverified until finish)."""
        self._h.update(prefix)
        if self._buf is not None:
            self._buf += prefix
        self._off = len(prefix)
        self.resumed = True

    def _write_sync(self, chunk: bytes | bytearray | memoryview, off: int) -> None:
        self._h.update(chunk)
        self._f.download.write(self.index, off, chunk)

    async def wait_idle(self) -> None:
        if self._idle is not None:
            await self._idle.wait()

    def _detach(self) -> None:
        ws = self._f._writers.get(self.index, [])
        if self in ws:
            ws.remove(self)
        if not ws:
            self._f._writers.pop(self.index, None)

    async def finish(self) -> None:
        self._detach()
        if self.dead:
            return
        f = self._f
        p = f.download.pieces[self.index]
        digest = self._h.digest()
        # An unknown hash (hub files) is learned here; the whole file is checked before it is final.
        if self._off != p.length or (p.hash != UNKNOWN_HASH and digest != p.hash):
            f._discarded += self._off
            if self.resumed:
                # The bytes kept from before the crash may be the bad part: fetch it whole, blame no one.
                f.download.partial.pop(self.index, None)
                raise SourceError(f"piece {self.index} did not verify after resuming mid-piece; fetching it whole")
            raise PieceHashMismatch(
                f"piece {self.index} ({f._path(self.index)} at byte {p.offset}) from {self._sid} failed its hash check", self.index
            )
        if f.picker.state(self.index) in (PieceState.WRITING, PieceState.DONE):
            f._discarded += self._off
            return
        others = f._writers.pop(self.index, [])
        for w in others:
            w.dead = True
        f._finalizing.add(self.index)
        try:
            if self._buf is not None:
                await self._write_buffered(others)
        finally:
            f._finalizing.discard(self.index)
        if f.picker.state(self.index) not in (PieceState.WRITING, PieceState.DONE):
            if p.hash == UNKNOWN_HASH:
                f.download.learned[self.index] = digest
            f._piece_written(self._sid, self.index)

    async def _write_buffered(self, others: list[_Writer]) -> None:
        f = self._f
        assert self._buf is not None
        # A direct writer of this piece may have a pwrite in a worker thread:
        # let it land before ours, so the verified bytes are the last written.
        for w in others:
            await w.wait_idle()
        if f.picker.state(self.index) not in (PieceState.WRITING, PieceState.DONE):
            await trio.to_thread.run_sync(f.download.write, self.index, 0, self._buf)

    def abort(self) -> None:
        self._detach()
        self._f._discarded += self._off
        self.dead = True


class _Sink:
    def __init__(self, fetch: Fetch, source_id: str) -> None:
        self._f = fetch
        self._sid = source_id
        self.taken: list[int] = []  # pieces taken on beyond the request (whole-file bodies)

    def open_piece(self, index: int, skip: int = 0) -> _Writer | _NullWriter:
        f = self._f
        if f.picker.state(index) in (PieceState.WRITING, PieceState.DONE) or index in f._finalizing:
            return _NullWriter(f, self._sid)
        direct = not any(w.direct and not w.dead for w in f._writers.get(index, []))
        w = _Writer(f, self._sid, index, direct)
        if skip:
            if f.download.partial.get(index) != skip:
                w.abort()
                raise SourceError(f"piece {index}: cannot resume at byte {skip}")
            w.resume(f.download.read_range(index, 0, skip))
        return w

    async def put(self, index: int, data: bytes | bytearray | memoryview) -> None:
        w = self.open_piece(index)
        await w.write(data)
        await w.finish()

    def take(self, index: int) -> bool:
        f = self._f
        if not f.picker.has_source(self._sid):
            return False
        if f.picker.take(self._sid, index, trio.current_time()):
            self.taken.append(index)
            return True
        return False

    def file_pieces(self, path: str) -> Sequence[PieceRef]:
        return self._f._file_refs[path]

    def wake(self) -> None:
        self._f._wake()


@dataclass(slots=True)
class _Req:
    source_id: str
    indices: list[int]
    scope: trio.CancelScope
    withdrawn: bool = False  # cancelled because the pieces are another node's to bring in


class Fetch:
    """One running fetch. Create, then ``await nursery.start(fetch.run)`` or ``await fetch.run()``.

    Swarm hooks (synchronous, callable from any trio task while it runs):
    :meth:`add_source`, :meth:`remove_source`, :meth:`source_have`,
    :meth:`source_bitfield`, :meth:`set_swarm`, :meth:`peer_claims`. ``PieceVerified``
    events go to ``events``; ``on_mirror_claims`` (given by the swarm) hears
    which pieces each mirror request asks for.
    """

    def __init__(
        self,
        store: Store,
        download: Download,
        sources: Iterable[Source] = (),
        events: trio.MemorySendChannel[Event] | None = None,
        options: FetchOptions | None = None,
        *,
        on_mirror_claims: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.store = store
        self.download = download
        self.options = options or FetchOptions()
        self._events = events
        self._on_mirror_claims = on_mirror_claims
        d = download
        self.picker = PiecePicker(
            [p.length for p in d.pieces],
            d.file_starts,
            have=d.done,
            wanted=d.wanted,
            endgame_copies=self.options.endgame_copies,
            endgame_delay=self.options.endgame_delay,
            mirror_overlap_budget=self.options.mirror_overlap_budget,
            me=self.options.swarm_id,
            owner_timeout=self.options.owner_timeout,
        )
        self._refs: list[PieceRef] = []
        self._file_refs: dict[str, list[PieceRef]] = {}
        for i, p in enumerate(d.pieces):
            f = d.manifest.files[d.file_of[i]]
            ref = PieceRef(i, f.path, p.offset, p.length, p.hash, f.size)
            self._refs.append(ref)
            self._file_refs.setdefault(f.path, []).append(ref)
        self._sources: dict[str, Source] = {}
        self._failures: dict[str, int] = {}
        self._answered: set[str] = set()  # sources that completed a request at least once
        self._first_refused: dict[str, float] = {}
        self._last_error: dict[str, str] = {}
        self._requests: dict[int, _Req] = {}
        self._fetchers = 1  # nodes fetching this manifest, this one included (set_swarm)
        self._next_req = 0
        self._writers: dict[int, list[_Writer]] = {}
        self._finalizing: set[int] = set()
        self._pending: dict[int, str] = {}
        self._committing: dict[int, str] = {}  # the batch in the commit thread
        self._wake_ev = trio.Event()
        self._commit_ev = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._received = 0
        # Progress display only: body bytes each source handed to writers, and the
        # part of its received count that never reached one (see _buffered_by_file).
        self._handed: dict[str, int] = {}
        self._unhanded_base: dict[str, int] = {}
        self._discarded = 0
        self.bytes_by_source: dict[str, int] = {}
        self.received_by_source: dict[str, int] = {}
        self._rx_base: dict[str, int] = {}
        self._bytes_done = 0
        self._by_file: dict[str, int] = {}
        self._file_sources: dict[int, set[str]] = {}  # file index -> sources that delivered its pieces
        # Peers far slower than the other sources lose their requests (protocol/_slowsource.py).
        self._slow = SlowSources()
        for s in sources:
            self.add_source(s)

    def sources(self) -> list[Source]:
        """The sources this fetch uses now (mirrors, peers, any given)."""
        return list(self._sources.values())

    # -- swarm hooks -----------------------------------------------------------
    def add_source(self, source: Source) -> None:
        if source.id in self._sources:
            return
        avail = source.availability()
        self._sources[source.id] = source
        self._rx_base[source.id] = _rx_count(source)
        self.picker.add_source(source.id, source.kind, None if avail is None else set(avail))
        self._wake()

    def remove_source(self, source_id: str) -> None:
        if source_id not in self._sources:
            return
        for req in list(self._requests.values()):
            if req.source_id == source_id:
                req.scope.cancel()
        self.picker.remove_source(source_id)
        self._slow.forget(source_id)
        src = self._sources.pop(source_id)
        self._settle_received(src)
        if self._nursery is not None:
            self._nursery.start_soon(src.aclose)
        self._wake()

    def source_have(self, source_id: str, index: int) -> None:
        if source_id in self._sources:
            self.picker.source_have(source_id, index)
            self._wake()

    def source_bitfield(self, source_id: str, indices: Iterable[int]) -> None:
        if source_id in self._sources:
            self.picker.source_bitfield(source_id, indices)
            self._wake()

    def set_swarm(self, peers: Iterable[str], complete: Iterable[str] = ()) -> None:
        """The peers fetching this manifest too: re-share the first copy among them.

        Pieces already asked of a mirror stay ours (the swarm told every
        member with a Claim, and tells a new member when it announces the
        manifest); any other mirror request whose pieces now belong to another
        node is withdrawn, so a peer found late costs at most the bytes in flight.
        """
        peers = list(peers)
        self._fetchers = 1 + len(peers)
        if not self.picker.set_swarm(peers, trio.current_time(), complete):
            return
        self._withdraw_not_ours()
        self._wake()

    def peer_progress(self, peer: str, index: int) -> None:
        self.picker.peer_progress(peer, index, trio.current_time())

    def peer_claims(self, peer: str, indices: Iterable[int]) -> None:
        """A swarm peer asked a mirror for these pieces: leave them to it (withdrawing ours if it wins the tie)."""
        if self.picker.peer_claims(peer, indices):
            self._withdraw_not_ours()
            self._wake()

    def piece_keys(self) -> list[tuple[bytes, int]]:
        """(BLAKE3 hash, length) of every piece, in index order (the swarm matches other manifests by them)."""
        return [(p.hash, p.length) for p in self.download.pieces]

    def file_sha256s(self) -> list[bytes]:
        """The SHA-256 of each wanted file that still misses pieces (the DHT has providers per file)."""
        d = self.download
        files = {d.file_of[i] for i in d.missing()}
        return [d.manifest.files[fi].sha256 for fi in d.wanted_files if fi in files]

    def mirror_claims(self) -> list[int]:
        """Pieces this fetch has asked a mirror for and not finished (a new swarm member hears them)."""
        return self.picker.my_claims()

    def _withdraw_not_ours(self) -> None:
        now = trio.current_time()
        for req in self._requests.values():
            src = self._sources.get(req.source_id)
            if src is not None and src.kind is SourceKind.MIRROR and not req.withdrawn:
                if not any(self.picker.mirror_may_take(i, now) for i in req.indices):
                    req.withdrawn = True
                    req.scope.cancel()

    # -- internals -------------------------------------------------------------
    def _settle_received(self, src: Source) -> None:
        n = _rx_count(src) - self._rx_base.pop(src.id, 0)
        if n > 0:
            self.received_by_source[src.id] = self.received_by_source.get(src.id, 0) + n

    def _wake(self) -> None:
        self._wake_ev.set()

    def _path(self, index: int) -> str:
        return self._refs[index].path

    def _send_nowait(self, ev: Event) -> None:
        if self._events is not None:
            try:
                self._events.send_nowait(ev)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _send(self, ev: Event) -> None:
        if self._events is not None:
            try:
                await self._events.send(ev)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._events = None

    def _piece_written(self, source_id: str, index: int) -> None:
        self._slow.delivered(source_id, self._refs[index].length, trio.current_time())
        others = self.picker.piece_written(source_id, index)
        self._file_sources.setdefault(self.download.file_of[index], set()).add(source_id)
        self.download.partial.pop(index, None)
        self._pending[index] = source_id
        self._commit_ev.set()
        for req in self._requests.values():
            if req.source_id in others and all(self.picker.state(i) >= PieceState.WRITING for i in req.indices):
                req.scope.cancel()

    def _max_requests(self, src: Source) -> int:
        n = src.max_requests()
        if src.kind is SourceKind.MIRROR and self._fetchers > 1:
            n = min(n, max(2, -(-self.options.swarm_mirror_connections // self._fetchers)))
        return n

    def _request_bytes(self, src: Source) -> int:
        limit = src.max_request_bytes()
        if src.kind is SourceKind.MIRROR:
            conns = sum(self._max_requests(s) for s in self._sources.values() if s.kind is SourceKind.MIRROR) or 1
            missing = sum(self._refs[i].length for i in range(len(self._refs)) if self.picker.state(i) == PieceState.NONE)
            limit = min(limit, max(missing // conns, 1))
        return limit

    def _order(self) -> list[Source]:
        rank = {SourceKind.LOCAL: 0, SourceKind.PEER: 1, SourceKind.MIRROR: 2}

        def key(s: Source) -> tuple[int, float]:
            return rank[s.kind], -(s.score.value if isinstance(s, _Scored) else 0.0)

        return sorted(self._sources.values(), key=key)

    def _schedule(self, nursery: trio.Nursery) -> None:
        now = trio.current_time()
        active: dict[str, int] = {}
        for r in self._requests.values():
            active[r.source_id] = active.get(r.source_id, 0) + 1
        progress = True
        while progress:
            progress = False
            for src in self._order():
                if active.get(src.id, 0) >= self._max_requests(src) or src.ready_at() > now:
                    continue
                if self._slow.snubbed(src.id, now):
                    continue
                picked = self.picker.pick(src.id, self._request_bytes(src), now)
                if not picked:
                    continue
                rid = self._next_req
                self._next_req += 1
                if rid == 0:
                    log.debug("%s: first request: pieces %s from %s", self.download.manifest_id.hex()[:16], picked, src.id)
                if src.kind is SourceKind.MIRROR and self._on_mirror_claims is not None:
                    self._on_mirror_claims(picked)
                req = _Req(src.id, picked, trio.CancelScope())
                self._requests[rid] = req
                active[src.id] = active.get(src.id, 0) + 1
                if src.kind is SourceKind.PEER:
                    self._slow.busy(src.id, True, now)
                nursery.start_soon(self._run_request, rid, src, req)
                progress = True

    async def _run_request(self, rid: int, src: Source, req: _Req) -> None:
        skip = self.download.partial.get(req.indices[0], 0) if src.kind is SourceKind.MIRROR else 0
        request = FetchRequest(self.download.manifest_id, tuple(self._refs[i] for i in req.indices), skip)
        failed_integrity: int | None = None
        error: AutoglmError | None = None
        sink = _Sink(self, src.id)
        try:
            with req.scope:
                await src.fetch(request, sink)
        except PieceHashMismatch as exc:
            error = exc
            failed_integrity = exc.piece_index
        except IntegrityError as exc:
            error = exc
        except SourceError as exc:
            error = exc
        except StorageError:
            raise
        finally:
            del self._requests[rid]
            if not any(r.source_id == src.id for r in self._requests.values()):
                self._slow.busy(src.id, False, trio.current_time())
            self._wake()
        if src.id not in self._sources:
            return
        if req.withdrawn and error is None:
            self.picker.cancel(src.id, [i for i in req.indices + sink.taken if src.id in self.picker.requesters(i)])
            return
        permanent = isinstance(error, PermanentMirrorError)
        undelivered = [i for i in req.indices + sink.taken if src.id in self.picker.requesters(i)]
        if error is None and len(undelivered) == len(req.indices) + len(sink.taken):
            # Returned without delivering anything: a peer that advertised what it
            # cannot serve. Count it as a failure so it cannot spin the loop.
            error = SourceError(f"{src.id} returned without delivering any of {len(req.indices)} requested pieces")
        for i in undelivered:
            self.picker.piece_failed(src.id, i, integrity=permanent or i == failed_integrity)
        if error is None:
            self._failures[src.id] = 0
            self._answered.add(src.id)
            return
        self._last_error[src.id] = str(error)
        self._failures[src.id] = self._failures.get(src.id, 0) + 1
        whole = isinstance(error, PermanentMirrorError) and error.whole_source
        too_many = self._failures[src.id] >= self.options.max_consecutive_failures or self._refused_for_good(src, error)
        log.info("source %s failed: %s", src.id, error)
        self._send_nowait(SourceFailed(src.id, str(error), integrity=isinstance(error, IntegrityError), permanent=permanent or whole or too_many))
        if whole or too_many:
            self.remove_source(src.id)

    def _refused_for_good(self, src: Source, error: AutoglmError) -> bool:
        """A mirror that never answered and refuses connections: nothing listens there."""
        if src.kind is not SourceKind.MIRROR or src.id in self._answered or not _connection_refused(error):
            return False
        now = trio.current_time()
        first = self._first_refused.setdefault(src.id, now)
        return self._failures[src.id] >= REFUSED_TRIES and now - first >= REFUSED_SPAN

    async def _committer(self) -> None:
        last = -float("inf")
        while True:
            await self._commit_ev.wait()
            # Group commit: at most one fdatasync per commit_interval, so the disk
            # writes big batches. Kill safety does not depend on it: recover()
            # re-hashes pieces that were written but not yet recorded.
            if self._pending and not self.picker.remaining <= len(self._pending):
                await trio.sleep_until(last + self.options.commit_interval)
            last = trio.current_time()
            self._commit_ev = trio.Event()
            batch, self._pending = self._pending, {}
            if not batch:
                continue
            self._committing = batch
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
                n = self._refs[i].length
                self._bytes_done += n
                self.bytes_by_source[sid] = self.bytes_by_source.get(sid, 0) + n
                path = self._refs[i].path
                self._by_file[path] = self._by_file.get(path, 0) + n
                await self._send(PieceVerified(self.download.manifest_id, i, sid, n, path))
            for fi in finished:
                f = self.download.manifest.files[fi]
                await self._send(FileDone(f.path, f.size))
            self._wake()

    async def _judge_sources(self) -> None:
        """Take the requests back from peers far slower than the other sources (a trickle is no stall)."""
        while True:
            await trio.sleep(0.5)
            now = trio.current_time()
            for sid in self._slow.judge(now):
                reqs = [r for r in self._requests.values() if r.source_id == sid]
                log.info("source %s is far slower than the others: %d request(s) go elsewhere, none for %.0f s",
                         sid, len(reqs), self._slow.snubbed_until(sid) - now)
                for r in reqs:
                    r.withdrawn = True
                    r.scope.cancel()
                self._wake()

    async def _ticker(self, total: int) -> None:
        def count() -> int:  # bytes off the wire (sources count them as they arrive), else as handed over
            return max(self._received, sum(self._received_by_source_now().values()))

        last_t, last_b = trio.current_time(), count()
        rate = 0.0
        while True:
            await trio.sleep(self.options.progress_interval)
            now = trio.current_time()
            received = count()
            inst = (received - last_b) / max(now - last_t, 1e-9)
            rate = inst if rate == 0.0 else 0.6 * rate + 0.4 * inst
            last_t, last_b = now, received
            self._send_nowait(self._snapshot(total, rate))

    def _snapshot(self, total: int, rate: float) -> ProgressSnapshot:
        in_flight = self._in_flight_by_file()
        for path, n in self._buffered_by_file().items():
            in_flight[path] = in_flight.get(path, 0) + n
        return ProgressSnapshot(self._bytes_done, total, self._received, rate, dict(self.bytes_by_source),
                                dict(self._by_file), in_flight, self._received_by_source_now())

    def _buffered_by_file(self) -> dict[str, int]:
        """Bytes a source has received but not yet handed to a writer, spread over its requests' files.

        A mirror fills a large buffer before it hands bytes over, and on a slow
        link many connections each hold a partly filled one. An estimate for a
        display: a source's received bytes minus those it handed over, capped by
        what its requests still miss; re-based whenever the source is idle, so
        bytes it skipped (a whole-file body) do not add up.
        """
        out: dict[str, int] = {}
        for sid, src in self._sources.items():
            unhanded = _rx_count(src) - self._rx_base.get(sid, 0) - self._handed.get(sid, 0)
            reqs = [r for r in self._requests.values() if r.source_id == sid]
            if not reqs:
                self._unhanded_base[sid] = unhanded
                continue
            extra = unhanded - self._unhanded_base.get(sid, 0)
            if extra <= 0:
                continue
            missing: dict[str, int] = {}
            for r in reqs:
                for i in r.indices:
                    if self.picker.state(i) < PieceState.WRITING:
                        got = max((w._off for w in self._writers.get(i, []) if not w.dead), default=0)
                        ref = self._refs[i]
                        missing[ref.path] = missing.get(ref.path, 0) + max(0, ref.length - got)
            left = sum(missing.values())
            if not left:
                continue
            extra = min(extra, left)
            for path, n in missing.items():
                out[path] = out.get(path, 0) + extra * n // left
        return out

    def _in_flight_by_file(self) -> dict[str, int]:
        """Bytes of pieces not yet committed, per file: written and queued, or streaming now.

        A display counts them so large pieces move the bar as bytes arrive. An
        endgame duplicate counts once (the furthest writer of a piece).
        """
        out: dict[str, int] = {}
        queued = {**self._pending, **self._committing}
        for i in queued:
            ref = self._refs[i]
            out[ref.path] = out.get(ref.path, 0) + ref.length
        for i, ws in self._writers.items():
            if i in queued:
                continue
            n = max((w._off for w in ws if not w.dead), default=0)
            if n:
                ref = self._refs[i]
                out[ref.path] = out.get(ref.path, 0) + n
        return out

    def _received_by_source_now(self) -> dict[str, int]:
        """Body bytes each source has sent so far, sources already removed included."""
        rx = dict(self.received_by_source)
        for sid, src in self._sources.items():
            n = _rx_count(src) - self._rx_base.get(sid, 0)
            if n > 0:
                rx[sid] = rx.get(sid, 0) + n
        return rx

    def _no_source_error(self) -> NoSourceError:
        missing = self.picker.remaining
        errs = "; ".join(f"{sid}: {msg}" for sid, msg in self._last_error.items()) or "no sources were given"
        return NoSourceError(f"no source can provide the {missing} missing pieces of {self.download.manifest.name}: {errs}")

    async def _prepare(self) -> int:
        """Recover crash leftovers, finish empty files, find local copies. Returns bytes already present."""
        d = self.download
        # What is on disk is what the manifest says: finished files that changed
        # since they were stamped (every one with check_sha256) are re-hashed and
        # their bad pieces fetched again.
        for i in await trio.to_thread.run_sync(d.check_finished, self.options.check_sha256):
            self.picker.piece_lost(i)
            log.warning("%s: piece %d no longer matches the manifest; fetching it again", self._path(i), i)
        found = await trio.to_thread.run_sync(d.recover)
        if found:
            await trio.to_thread.run_sync(d.commit, found)
            for i in found:
                self.picker.piece_done(i)
        self.picker.break_runs_at(d.partial)
        for fi in await trio.to_thread.run_sync(d.finish_empty_files):
            await self._send(FileDone(d.manifest.files[fi].path, 0))
        present = d.total_bytes - d.missing_bytes()
        for f in d.manifest.files:
            self._by_file[f.path] = 0
        for i in d.done:
            self._by_file[self._refs[i].path] = self._by_file.get(self._refs[i].path, 0) + self._refs[i].length
        if self.options.local_copies:

            def find_local() -> dict[int, PieceLocation]:  # one thread hop for every missing piece
                found = ((i, self.store.find_by_hash(d.pieces[i].hash, d.id)) for i in d.missing() if d.pieces[i].hash != UNKNOWN_HASH)
                return {i: loc for i, loc in found if loc is not None}

            locs = await trio.to_thread.run_sync(find_local)
            if locs:
                copied, finished = await trio.to_thread.run_sync(_copy_local, d, locs)
                for i in copied:
                    self.picker.piece_done(i)
                    n = self._refs[i].length
                    self.bytes_by_source[LOCAL_ID] = self.bytes_by_source.get(LOCAL_ID, 0) + n
                    self._by_file[self._refs[i].path] += n
                    await self._send(PieceVerified(d.manifest_id, i, LOCAL_ID, n, self._refs[i].path))
                for fi in finished:
                    await self._send(FileDone(d.manifest.files[fi].path, d.manifest.files[fi].size))
        return present

    async def run(
        self, *, go: trio.Event | None = None, task_status: TaskStatus[Fetch] = trio.TASK_STATUS_IGNORED
    ) -> FetchResult:
        """Fetch every wanted piece; returns a summary. Raises NoSourceError, StorageError, ...

        ``go``: the caller's go-ahead. Preparation (space check, crash
        recovery, local copies) runs at once; the first request waits for
        ``go`` (the swarm finds its peers meanwhile). A fetch that fails
        before anything was verified or staged leaves nothing behind.
        """
        try:
            return await self._run(go, task_status)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.download.discard_if_untouched)
            raise

    async def _run(self, go: trio.Event | None, task_status: TaskStatus[Fetch]) -> FetchResult:
        t0 = trio.current_time()
        d = self.download
        if self.options.check_space:
            await trio.to_thread.run_sync(preflight, d, self.options.space_margin)
        d.check_sha256 = self.options.check_sha256
        await trio.to_thread.run_sync(d.lock)
        present = await self._prepare()
        log.debug("%s: prepared in %.3f s", d.manifest_id.hex()[:16], trio.current_time() - t0)
        if go is not None:
            await go.wait()
        # Local copies count as done (they are verified and committed), though not as present before the run.
        self._bytes_done = d.total_bytes - d.missing_bytes()
        total = d.total_bytes
        m = d.manifest
        await self._send(
            FetchStarted(d.manifest_id.hex(), m.name, m.version, str(d.out_dir),
                         tuple((m.files[fi].path, m.files[fi].size) for fi in d.wanted_files), total, present,
                         tuple(self._sources), {p: n for p, n in self._by_file.items() if n})
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._committer)
                nursery.start_soon(self._ticker, total)
                nursery.start_soon(self._judge_sources)
                task_status.started(self)
                while not self.picker.is_complete:
                    self._wake_ev = trio.Event()
                    self._schedule(nursery)
                    if not self._requests and not self._pending and not self.picker.is_complete:
                        if not self.picker.can_serve_missing() and not self.options.wait_for_sources:
                            raise self._no_source_error()
                    # Wake when a backed-off source becomes usable again, even while others are busy.
                    now = trio.current_time()
                    deadline = min((t for s in self._sources.values() if (t := s.ready_at()) > now), default=float("inf"))
                    deadline = min([deadline, *(t for s in self._sources if (t := self._slow.snubbed_until(s)) > now)])
                    owner_due = self.picker.next_deadline()
                    if owner_due is not None and owner_due > now:
                        deadline = min(deadline, owner_due)
                    with trio.move_on_at(deadline):
                        await self._wake_ev.wait()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as eg:
            raise collapse_group(eg) from None
        finally:
            self._nursery = None
            for src in list(self._sources.values()):
                with trio.CancelScope(shield=True):
                    await src.aclose()
            await trio.to_thread.run_sync(d.close)
        seconds = trio.current_time() - t0
        refetched = self._discarded
        for src in self._sources.values():
            self._settle_received(src)
            self._rx_base[src.id] = _rx_count(src)
        rx = dict(self.received_by_source)
        # The last snapshot: a display ends on the numbers of the result (a run
        # with nothing to fetch never ticks).
        await self._send(ProgressSnapshot(self._bytes_done, total, self._received, 0.0, dict(self.bytes_by_source),
                                          dict(self._by_file), {}, dict(rx)))
        result = FetchResult(d.manifest_id, str(d.out_dir), total, dict(self.bytes_by_source), seconds, refetched, rx)
        await self._send(FetchDone(total, dict(self.bytes_by_source), seconds, refetched, str(d.out_dir), dict(rx)))
        return result


def _rx_count(src: Source) -> int:
    """Bytes the source has received so far, where it counts them (mirrors, peers)."""
    return src.bytes_received if isinstance(src, _Counting) else 0


def _copy_local(d: Download, locs: dict[int, PieceLocation]) -> tuple[list[int], list[int]]:
    """Copy pieces that exist elsewhere in the store (same hash), verify, commit. Blocking."""
    copied = []
    for i, loc in locs.items():
        try:
            data = _pread(loc)
        except OSError:
            continue
        if blake3.blake3(data).digest() == d.pieces[i].hash:
            d.write(i, 0, data)
            copied.append(i)
    return copied, d.commit(copied)


def _connection_refused(exc: BaseException) -> bool:
    """True when the error comes from a refused TCP connection (ECONNREFUSED)."""
    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain is short; bound it anyway
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def collapse_group(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """One exception out of a nursery's group: KeyboardInterrupt, then storage, then other AutoglmError."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        else:
            leaves.append(e)

    walk(eg)
    for cls in (KeyboardInterrupt, StorageError, AutoglmError):
        for e in leaves:
            if isinstance(e, cls):
                return e
    non_cancel = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    return non_cancel[0] if non_cancel else leaves[0]


_collapse = collapse_group  # older name, still imported by node/_swarm_node.py
