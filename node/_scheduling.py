"""Source scheduling for one fetch: which source gets which request, and which source is judged failed or slow.

:class:`SourceScheduler` holds the fetch's sources and its requests in
flight. :meth:`~SourceScheduler.schedule` asks the pure
:class:`~autoglm.protocol._picker.PiecePicker` for work for every source that
has spare capacity, is out of backoff and not snubbed, and starts one *request
task* per pick; it never awaits IO while deciding. A request task awaits
``source.fetch(request, sink)`` and, on return or failure, updates the picker
and the source's failure count (a source failing too often, or a mirror that
refuses every connection, is removed). :meth:`~SourceScheduler.run_judge`
takes the requests back from peers far slower than the other sources
(``protocol/_slowsource.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

import trio

from autoglm.node._delivery import Delivery, PieceHashMismatch
from autoglm.node._fetchstats import FetchStats
from autoglm.node._http import PermanentMirrorError
from autoglm.node._progress import SourceFailed
from autoglm.node._sources import FetchRequest, Source, SourceKind
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
    from autoglm.node._engine import FetchOptions
    from autoglm.node._mirrors import MirrorScore
    from autoglm.node._progress import Event

__all__ = ["REFUSED_SPAN", "REFUSED_TRIES", "SourceScheduler"]

# A mirror that refuses every connection and never answered: give up after this
# many failed tries spread over at least REFUSED_SPAN seconds (instead of the
# max_consecutive_failures with backoff, ~30 s, that fit flaky mirrors).
REFUSED_TRIES = 3
REFUSED_SPAN = 1.0

log = logging.getLogger("autoglm.node._engine")  # the engine's parts log as the engine


@runtime_checkable
class _Scored(Protocol):
    """A source ranked among those of its kind by a score (mirrors)."""

    @property
    def score(self) -> MirrorScore: ...


# Source type -> whether it is _Scored: isinstance against a runtime-checkable
# Protocol walks the class's attributes on every call (~20 us), and _order runs
# for every source on every wake-up; the answer depends on the type only.
_SCORED: dict[type, bool] = {}


@dataclass(slots=True)
class _Req:
    source_id: str
    indices: list[int]
    scope: trio.CancelScope
    withdrawn: bool = False  # cancelled because the pieces are another node's to bring in


class SourceScheduler:
    """The sources of one fetch and their requests. ``nursery`` is set while the fetch runs."""

    def __init__(
        self,
        picker: PiecePicker,
        delivery: Delivery,
        stats: FetchStats,
        options: FetchOptions,
        *,
        send_nowait: Callable[[Event], None],
        on_mirror_claims: Callable[[list[int]], None] | None = None,
    ) -> None:
        self._picker = picker
        self._delivery = delivery
        self._download = delivery.download
        self._refs = delivery.refs
        self._stats = stats
        self._options = options
        self._send_nowait = send_nowait
        self._on_mirror_claims = on_mirror_claims
        self.sources: dict[str, Source] = {}
        self._requests: dict[int, _Req] = {}
        self._next_req = 0
        self._failures: dict[str, int] = {}
        self._answered: set[str] = set()  # sources that completed a request at least once
        self._first_refused: dict[str, float] = {}
        self._last_error: dict[str, str] = {}
        self._fetchers = 1  # nodes fetching this manifest, this one included (set_fetchers)
        # Peers far slower than the other sources lose their requests (protocol/_slowsource.py).
        self._slow = SlowSources()
        self._unrequested: int | None = None  # cache of _unrequested_bytes() within one schedule() pass
        self.nursery: trio.Nursery | None = None
        #: Stopping (Fetch.drain): no request starts; requests in flight end with their current piece.
        self.draining = False
        self.scheduled_at = 0.0  # trio time of the last schedule(): deadlines are judged against it

    # -- sources ---------------------------------------------------------------
    def add(self, source: Source) -> bool:
        if source.id in self.sources:
            return False
        avail = source.availability()
        self.sources[source.id] = source
        self._stats.track(source)
        self._picker.add_source(source.id, source.kind, None if avail is None else set(avail))
        return True

    def remove(self, source_id: str) -> bool:
        if source_id not in self.sources:
            return False
        for req in list(self._requests.values()):
            if req.source_id == source_id:
                req.scope.cancel()
        self._picker.remove_source(source_id)
        self._slow.forget(source_id)
        src = self.sources.pop(source_id)
        self._stats.settle(src)
        if self.nursery is not None:
            self.nursery.start_soon(src.aclose)
        return True

    def set_fetchers(self, n: int) -> None:
        """``n`` nodes fetch this manifest, this one included: share the mirrors' connections out."""
        self._fetchers = n

    @property
    def idle(self) -> bool:
        """No request in flight."""
        return not self._requests

    def missing_by_request(self) -> dict[str, dict[str, int]]:
        """Per source with requests in flight: per file, the bytes its requests still miss."""
        out: dict[str, dict[str, int]] = {}
        for r in self._requests.values():
            missing = out.setdefault(r.source_id, {})
            for i in r.indices:
                if self._picker.state(i) < PieceState.WRITING:
                    ref = self._refs[i]
                    missing[ref.path] = missing.get(ref.path, 0) + max(0, ref.length - self._delivery.written(i))
        return out

    def withdraw_not_ours(self) -> None:
        """Cancel each mirror request none of whose pieces this node may still bring in (another node owns them)."""
        fc = self._picker.first_copy
        if fc is None:
            return
        now = trio.current_time()
        for req in self._requests.values():
            src = self.sources.get(req.source_id)
            if src is not None and src.kind is SourceKind.MIRROR and not req.withdrawn:
                if not any(fc.mirror_may_take(i, now) for i in req.indices):
                    req.withdrawn = True
                    req.scope.cancel()

    def piece_written(self, source_id: str, index: int, others: Collection[str]) -> None:
        """A piece matched its hash: credit its source, cancel requests whose every piece is now written."""
        self._slow.delivered(source_id, self._refs[index].length, trio.current_time())
        for req in self._requests.values():
            if req.source_id in others and all(self._picker.state(i) >= PieceState.WRITING for i in req.indices):
                req.scope.cancel()

    def next_deadline(self, now: float) -> float:
        """When a backed-off or snubbed source becomes usable again, or a piece owner's time runs out."""
        deadline = min((t for s in self.sources.values() if (t := s.ready_at()) > now), default=float("inf"))
        deadline = min([deadline, *(t for s in self.sources if (t := self._slow.snubbed_until(s)) > now)])
        owner_due = self._picker.next_deadline(now)
        if owner_due is not None and owner_due > now:
            deadline = min(deadline, owner_due)
        return deadline

    def no_source_error(self) -> NoSourceError:
        missing = self._picker.remaining
        errs = "; ".join(f"{sid}: {msg}" for sid, msg in self._last_error.items()) or "no sources were given"
        return NoSourceError(f"no source can provide the {missing} missing pieces of {self._download.manifest.name}: {errs}")

    async def aclose(self) -> None:
        for src in list(self.sources.values()):
            with trio.CancelScope(shield=True):
                await src.aclose()

    # -- deciding --------------------------------------------------------------
    def max_requests(self, src: Source) -> int:
        """Requests ``src`` may have in flight: its own limit, and a share of the swarm's for a mirror."""
        n = src.max_requests()
        if src.kind is SourceKind.MIRROR and self._fetchers > 1:
            n = min(n, max(2, -(-self._options.swarm_mirror_connections // self._fetchers)))
        return n

    def _request_bytes(self, src: Source) -> int:
        limit = src.max_request_bytes()
        if src.kind is SourceKind.MIRROR:
            conns = sum(self.max_requests(s) for s in self.sources.values() if s.kind is SourceKind.MIRROR) or 1
            limit = min(limit, max(self._unrequested_bytes() // conns, 1))
        return limit

    def _unrequested_bytes(self) -> int:
        """Bytes of the pieces nobody has asked for yet; computed once per pass until a pick changes them."""
        if self._unrequested is None:
            state = self._picker.state
            self._unrequested = sum(ref.length for ref in self._refs if state(ref.index) == PieceState.NONE)
        return self._unrequested

    def _order(self) -> list[Source]:
        rank = {SourceKind.LOCAL: 0, SourceKind.PEER: 1, SourceKind.MIRROR: 2}

        def key(s: Source) -> tuple[int, float]:
            scored = _SCORED.get(type(s))
            if scored is None:
                scored = _SCORED[type(s)] = isinstance(s, _Scored)
            return rank[s.kind], -(cast(_Scored, s).score.value if scored else 0.0)

        return sorted(self.sources.values(), key=key)

    def schedule(self, nursery: trio.Nursery) -> None:
        """Start a request for every source with spare capacity that the picker has work for.

        Local sources go first and alone: they claim every piece they hold
        before a network source is asked for anything.
        """
        now = self.scheduled_at = trio.current_time()
        if self.draining:
            return
        # The picker's states change only through the picks below while this
        # runs: the scan for unrequested bytes is done once, again after a pick.
        self._unrequested = None
        active: dict[str, int] = {}
        for r in self._requests.values():
            active[r.source_id] = active.get(r.source_id, 0) + 1
        order = self._order()
        for group in ([s for s in order if s.kind is SourceKind.LOCAL], order):
            progress = True
            while progress:
                progress = False
                for src in group:
                    if active.get(src.id, 0) < self.max_requests(src) and self._start_one(nursery, src, now):
                        active[src.id] = active.get(src.id, 0) + 1
                        progress = True

    def _start_one(self, nursery: trio.Nursery, src: Source, now: float) -> bool:
        """Ask the picker for a request for ``src`` and start it; False when there is none."""
        if src.ready_at() > now or self._slow.snubbed(src.id, now):
            return False
        picked = self._picker.pick(src.id, self._request_bytes(src), now)
        if picked:
            self._unrequested = None
        picked = self._local_first(src, picked)
        if not picked:
            return False
        rid = self._next_req
        self._next_req += 1
        if rid == 0:
            log.debug("%s: first request: pieces %s from %s", self._download.manifest_id.hex()[:16], picked, src.id)
        if src.kind is SourceKind.MIRROR and self._on_mirror_claims is not None:
            self._on_mirror_claims(picked)
        req = _Req(src.id, picked, trio.CancelScope())
        self._requests[rid] = req
        if src.kind is SourceKind.PEER:
            self._slow.busy(src.id, True, now)
        nursery.start_soon(self._run_request, rid, src, req)
        return True

    def _local_first(self, src: Source, picked: list[int]) -> list[int]:
        """No network duplicate of a piece a local source is reading (an endgame pick): give it back."""
        if src.kind is SourceKind.LOCAL:
            return picked
        dup = [i for i in picked if any((s := self.sources.get(r)) is not None and s.kind is SourceKind.LOCAL
                                        for r in self._picker.requesters(i))]
        if dup:
            self._picker.cancel(src.id, dup)
            return [i for i in picked if i not in dup]
        return picked

    # -- one request -----------------------------------------------------------
    async def _run_request(self, rid: int, src: Source, req: _Req) -> None:
        skip = self._download.partial.get(req.indices[0], 0) if src.kind is SourceKind.MIRROR else 0
        request = FetchRequest(self._download.manifest_id, tuple(self._refs[i] for i in req.indices), skip)
        failed_integrity: int | None = None
        error: AutoglmError | None = None
        sink = self._delivery.sink(src.id)
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
            self._delivery.wake()
        if src.id not in self.sources:
            return
        if (req.withdrawn and error is None) or self.draining:  # no blame: we stopped it
            self._picker.cancel(src.id, [i for i in req.indices + sink.taken if src.id in self._picker.requesters(i)])
            return
        self._settle(src, req, sink.taken, error, failed_integrity)

    def _settle(self, src: Source, req: _Req, taken: list[int], error: AutoglmError | None, failed_integrity: int | None) -> None:
        """After a request: give back what it did not deliver, count a failure, remove a source that failed for good."""
        permanent = isinstance(error, PermanentMirrorError)
        undelivered = [i for i in req.indices + taken if src.id in self._picker.requesters(i)]
        if error is None and len(undelivered) == len(req.indices) + len(taken):
            # Returned without delivering anything: a peer that advertised what it
            # cannot serve. Count it as a failure so it cannot spin the loop.
            error = SourceError(f"{src.id} returned without delivering any of {len(req.indices)} requested pieces")
        for i in undelivered:
            self._picker.piece_failed(src.id, i, integrity=permanent or i == failed_integrity)
        if error is None:
            self._failures[src.id] = 0
            self._answered.add(src.id)
            return
        self._last_error[src.id] = str(error)
        self._failures[src.id] = self._failures.get(src.id, 0) + 1
        whole = isinstance(error, PermanentMirrorError) and error.whole_source
        too_many = self._failures[src.id] >= self._options.max_consecutive_failures or self._refused_for_good(src, error)
        log.info("source %s failed: %s", src.id, error)
        self._send_nowait(SourceFailed(src.id, str(error), integrity=isinstance(error, IntegrityError), permanent=permanent or whole or too_many))
        if whole or too_many:
            self.remove(src.id)
            self._delivery.wake()

    def _refused_for_good(self, src: Source, error: AutoglmError) -> bool:
        """A mirror that never answered and refuses connections: nothing listens there."""
        if src.kind is not SourceKind.MIRROR or src.id in self._answered or not _connection_refused(error):
            return False
        now = trio.current_time()
        first = self._first_refused.setdefault(src.id, now)
        return self._failures[src.id] >= REFUSED_TRIES and now - first >= REFUSED_SPAN

    async def run_judge(self) -> None:
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
                self._delivery.wake()


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

