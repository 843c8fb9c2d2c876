"""The fetch engine: the picker decides, sources do the IO, the store commits.

Theory of operation
-------------------
One :class:`Fetch` assembles one :class:`~autoglm.node._store.Download`. It is
a façade over three parts with one job each, which reach each other through
public methods only:

* :class:`~autoglm.node._scheduling.SourceScheduler` (``node/_scheduling.py``):
  the sources and the requests in flight. The *loop* (``run`` itself) wakes
  when something changed and has the scheduler ask the pure
  :class:`~autoglm.protocol._picker.PiecePicker` for work for every source
  with spare capacity; it starts one *request task* per pick and never awaits
  IO while deciding. Request tasks ``await source.fetch(request, sink)``; on
  return or failure they update the picker and wake the loop. Failures are
  isolated per request; the scheduler's *judge* task takes requests back from
  peers far slower than the rest.
* :class:`~autoglm.node._delivery.Delivery` (``node/_delivery.py``): the sink
  every request writes into, one writer per piece (hashed as bytes arrive),
  and the *committer*: group commit of the pieces whose hash matched, then
  ``PieceVerified``.
* :class:`~autoglm.node._fetchstats.FetchStats` (``node/_fetchstats.py``):
  the counters (bytes per source and per file, received, refetched) and the
  *ticker* that sends progress snapshots.

Before the first request, :meth:`Fetch.run` prepares the download (space
check, crash recovery, re-check of finished files) and finds the pieces that
lie on this machine already (``node/_locations.py``: the store, the output
directory's old files, the Hugging Face cache); each place becomes a source
of kind ``LOCAL`` that the scheduler serves first, in parallel with the
network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from autoglm.node._delivery import THREAD_MIN, Delivery, PieceHashMismatch
from autoglm.node._fetchstats import FetchStats
from autoglm.node._locations import STORE_ID, LocalSource, find_local_pieces
from autoglm.node._progress import (
    Event,
    FetchDone,
    FetchStarted,
    FileDone,
    ProgressSnapshot,
)
from autoglm.node._scheduling import REFUSED_SPAN, REFUSED_TRIES, SourceScheduler
from autoglm.node._sources import PieceRef, Source
from autoglm.node._store import (
    Download,
    Store,
    preflight,
)
from autoglm.node.errors import AutoglmError, StorageError
from autoglm.protocol._ownership import FirstCopy
from autoglm.protocol._picker import PiecePicker, SourceKind

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = ["LOCAL_ID", "Fetch", "FetchOptions", "FetchResult", "collapse_group"]
# Kept importable here for the modules and tests that import them from the engine.
_reexported = (REFUSED_SPAN, REFUSED_TRIES, THREAD_MIN, PieceHashMismatch)

LOCAL_ID = STORE_ID  # pieces copied from elsewhere in the store

log = logging.getLogger(__name__)


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
    # A reader waits on the files (the Hub gateway streams them to its clients):
    # the front of each file first, a readahead window of this many bytes
    # ahead of its first missing piece (picker rule 6, protocol/_stream.py).
    stream: bool = False
    stream_window: int = 64 * 1024 * 1024


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
        d = download
        sizes = [p.length for p in d.pieces]
        opts = self.options
        #: Who brings each piece into the swarm (None: not a swarm fetch); the picker consults it.
        self.first_copy = None if opts.swarm_id is None else FirstCopy(opts.swarm_id, sizes, opts.owner_timeout)
        self.picker = PiecePicker(
            sizes,
            d.file_starts,
            have=d.done,
            wanted=d.wanted,
            endgame_copies=opts.endgame_copies,
            endgame_delay=opts.endgame_delay,
            mirror_overlap_budget=opts.mirror_overlap_budget,
            first_copy=self.first_copy,
            stream_window=opts.stream_window if opts.stream else None,
        )
        self._refs: list[PieceRef] = []
        for i, p in enumerate(d.pieces):
            f = d.manifest.files[d.file_of[i]]
            self._refs.append(PieceRef(i, f.path, p.offset, p.length, p.hash, f.size))
        self._wake_ev = trio.Event()
        self._drained = trio.Event()
        self.stats = FetchStats(self._refs)
        self.delivery = Delivery(d, self.picker, self._refs, self.stats, send=self._send, wake=self._wake,
                                 on_written=self._piece_written, commit_interval=self.options.commit_interval)
        self.picker.progress = self.delivery.written  # the endgame judges a request by its bytes so far
        self.scheduler = SourceScheduler(self.picker, self.delivery, self.stats, self.options,
                                         send_nowait=self._send_nowait, on_mirror_claims=_logged_mirror_claims(self, on_mirror_claims))
        for s in sources:
            self.add_source(s)

    def sources(self) -> list[Source]:
        """The sources this fetch uses now (mirrors, peers, any given)."""
        return list(self.scheduler.sources.values())

    @property
    def bytes_by_source(self) -> dict[str, int]:
        """Verified bytes per source so far."""
        return self.stats.bytes_by_source

    @property
    def received_by_source(self) -> dict[str, int]:
        """Body bytes each removed source sent (a running source's are settled at the end)."""
        return self.stats.received_by_source

    # -- swarm hooks -----------------------------------------------------------
    def add_source(self, source: Source) -> None:
        if self.scheduler.add(source):
            self._wake()

    def remove_source(self, source_id: str) -> None:
        if self.scheduler.remove(source_id):
            self._wake()

    def source_have(self, source_id: str, index: int) -> None:
        if source_id in self.scheduler.sources:
            self.picker.source_have(source_id, index)
            self._wake()

    def source_bitfield(self, source_id: str, indices: Iterable[int]) -> None:
        if source_id in self.scheduler.sources:
            self.picker.source_bitfield(source_id, indices)
            self._wake()

    def set_swarm(self, peers: Iterable[str], complete: Iterable[str] = (), relayed: Iterable[str] = ()) -> None:
        """The peers fetching this manifest too: re-share the first copy among them.

        ``relayed``: fetchers known by peer exchange only, with no session here
        (first-copy members whose pieces reach us through others: FirstCopy).

        Pieces already asked of a mirror stay ours (the swarm told every
        member with a Claim, and tells a new member when it announces the
        manifest); any other mirror request whose pieces now belong to another
        node is withdrawn, so a peer found late costs at most the bytes in flight.
        """
        peers = list(peers)
        self.scheduler.set_fetchers(1 + len(peers))
        # complete peers keep their share until they go stale like any other owner
        if self.first_copy is None or not self.first_copy.set_members([*peers, *complete], trio.current_time(), relayed):
            return
        self.scheduler.withdraw_not_ours()
        self._wake()

    def peer_progress(self, peer: str, index: int) -> None:
        """A swarm peer sent a Have for ``index`` (see FirstCopy.progress)."""
        if self.first_copy is not None:
            self.first_copy.progress(peer, index, trio.current_time(), wanted=self.picker.wants(index))

    def peer_claims(self, peer: str, indices: Iterable[int]) -> None:
        """A swarm peer asked a mirror for these pieces: leave them to it (withdrawing ours if it wins the tie)."""
        fc = self.first_copy
        if fc is not None and fc.peer_claims(peer, indices, done=self.picker.done, requested=self.picker.taken):
            self.scheduler.withdraw_not_ours()
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
        return [] if self.first_copy is None else self.first_copy.my_claims(self.picker.done)

    def drain(self) -> None:
        """Stop: no new request or piece starts; the pieces in flight finish and are committed.

        The fetch then idles until it is cancelled (:meth:`drained` says when):
        a SIGTERM'd node keeps every piece that was arriving, not whole fetches.
        """
        self.scheduler.draining = True
        self.delivery.draining = True
        if self.scheduler.nursery is None:  # not fetching (preparing, or done): nothing in flight
            self._drained.set()
        self._wake()

    async def drained(self) -> None:
        """Return once a drained fetch has nothing in flight and nothing left to commit."""
        await self._drained.wait()

    # -- internals -------------------------------------------------------------
    def _wake(self) -> None:
        self._wake_ev.set()

    def _piece_written(self, source_id: str, index: int, others: Collection[str]) -> None:
        self.scheduler.piece_written(source_id, index, others)

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

    def _snapshot(self, total: int, rate: float) -> ProgressSnapshot:
        srcs = self.scheduler.sources.values()
        in_flight = self.delivery.in_flight_by_file()
        for path, n in self.stats.buffered_by_file(srcs, self.scheduler.missing_by_request()).items():
            in_flight[path] = in_flight.get(path, 0) + n
        return self.stats.snapshot(total, rate, in_flight, self.stats.received_now(srcs))

    async def _prepare(self) -> int:
        """Recover crash leftovers, finish empty files, find local copies. Returns bytes already present."""
        d = self.download
        # What is on disk is what the manifest says: finished files that changed
        # since they were stamped (every one with check_sha256) are re-hashed and
        # their bad pieces fetched again.
        for i in await trio.to_thread.run_sync(d.check_finished, self.options.check_sha256):
            self.picker.piece_lost(i)
            log.warning("%s: piece %d no longer matches the manifest; fetching it again", self._refs[i].path, i)
        found = await trio.to_thread.run_sync(d.recover)
        if found:
            await trio.to_thread.run_sync(d.commit, found)
            for i in found:
                self.picker.piece_done(i)
        self.picker.break_runs_at(d.partial)
        for fi in await trio.to_thread.run_sync(d.finish_empty_files):
            await self._send(FileDone(d.manifest.files[fi].path, 0))
        present = d.total_bytes - d.missing_bytes()
        by_file = self.stats.by_file
        for f in d.manifest.files:
            by_file[f.path] = 0
        for i in d.done:
            by_file[self._refs[i].path] = by_file.get(self._refs[i].path, 0) + self._refs[i].length
        if self.options.local_copies:
            for src in await trio.to_thread.run_sync(_find_local, self.store, d):
                log.info("%s: %d piece(s) may come from %s", d.manifest_id.hex()[:16], src.piece_count, src.id)
                self.add_source(src)
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
            if self.first_copy is not None:  # owners' silence counts from our first request
                self.first_copy.restart_clock(trio.current_time())
        # Local copies count as done (they are verified and committed), though not as present before the run.
        self.stats.bytes_done = d.total_bytes - d.missing_bytes()
        total = d.total_bytes
        m = d.manifest
        await self._send(
            FetchStarted(d.manifest_id.hex(), m.name, m.version, str(d.out_dir),
                         tuple((m.files[fi].path, m.files[fi].size) for fi in d.wanted_files), total, present,
                         tuple(self.scheduler.sources), {p: n for p, n in self.stats.by_file.items() if n})
        )
        try:
            await self._loop(total, task_status)
        except BaseExceptionGroup as eg:
            raise collapse_group(eg) from None
        finally:
            self.scheduler.nursery = None
            self._drained.set()  # over, one way or another: nothing is in flight
            await self.scheduler.aclose()
            await trio.to_thread.run_sync(d.close)
        return await self._finish(trio.current_time() - t0, total)

    async def _loop(self, total: int, task_status: TaskStatus[Fetch]) -> None:
        sched = self.scheduler
        async with trio.open_nursery() as nursery:
            sched.nursery = nursery
            nursery.start_soon(self.delivery.run_committer)
            nursery.start_soon(self.stats.run_ticker, self.options.progress_interval, self.scheduler.sources.values,
                               lambda rate: self._snapshot(total, rate), self._send_nowait)
            nursery.start_soon(sched.run_judge)
            task_status.started(self)
            while not self.picker.is_complete:
                self._wake_ev = trio.Event()
                sched.schedule(nursery)
                if sched.draining:
                    if sched.idle and self.delivery.idle:
                        self._drained.set()
                elif sched.idle and not self.delivery.has_pending and not self.picker.is_complete:
                    if not self.picker.can_serve_missing() and not self.options.wait_for_sources:
                        raise sched.no_source_error()
                # Wake when a backed-off source becomes usable again, even while others are busy.
                # Deadlines are judged at the time schedule() judged readiness: a back-off that
                # ends between the two (a loaded machine) is then a deadline in the past, an
                # immediate wake, not a source forgotten until something else happens.
                with trio.move_on_at(sched.next_deadline(sched.scheduled_at)):
                    await self._wake_ev.wait()
            nursery.cancel_scope.cancel()

    async def _finish(self, seconds: float, total: int) -> FetchResult:
        d, st = self.download, self.stats
        for src in self.scheduler.sources.values():
            st.settle(src)
            st.track(src)
        rx = dict(st.received_by_source)
        # The last snapshot: a display ends on the numbers of the result (a run
        # with nothing to fetch never ticks).
        await self._send(st.snapshot(total, 0.0, {}, dict(rx)))
        result = FetchResult(d.manifest_id, str(d.out_dir), total, dict(st.bytes_by_source), seconds, st.discarded, rx)
        await self._send(FetchDone(total, dict(st.bytes_by_source), seconds, st.discarded, str(d.out_dir), dict(rx)))
        return result



def _find_local(store: Store, d: Download) -> list[LocalSource]:
    """The local sources: the store, the output directory's old files, the HF cache. Blocking (hashes old files)."""
    from autoglm.node.hub._cache import hub_cache_dir  # the root huggingface_hub uses

    found = find_local_pieces(store, d, hub_cache_dir())
    return [LocalSource(sid, spots, [p.length for p in d.pieces]) for sid, spots in found.items()]


def _logged_mirror_claims(fetch: Fetch, post: Callable[[list[int]], None] | None) -> Callable[[list[int]], None] | None:
    """``post`` (the swarm's Claim), after logging why the first-copy rules let a mirror take each piece."""
    fc = fetch.first_copy
    if post is None or fc is None:
        return post

    def hook(indices: list[int]) -> None:
        if log.isEnabledFor(logging.DEBUG):  # one line per piece a mirror takes (docs/benchmarks.md, N=16)
            mid = fetch.download.manifest_id.hex()[:16]
            peers = [s for s in fetch.scheduler.sources.values() if s.kind is SourceKind.PEER]
            for i in indices:
                held = sum(1 for s in peers if (a := s.availability()) is None or i in a)
                log.debug("%s: mirror takes %d: %s, %d requester(s) %d member(s) %d peer source(s) %d holding it",
                         mid, i, fc.mirror_reason(i), len(fetch.picker.requesters(i)), len(fc.members()),
                         len(peers), held)
        post(indices)

    return hook


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
