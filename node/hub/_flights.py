"""The gateway's fetch registry: revisions resolved once, one *flight* per file shared by every client.

A revision is resolved once per endpoint set by :func:`~._api.resolve_snapshot`
(a commit for good, a branch or tag for ``revision_ttl`` seconds), one
resolution shared by every request that needs it. A file's bytes come from a
:class:`Flight`, shared by every client that asks for the same blob
(single-flight per repository and blob). A flight is fed either by the
node's own hub fetch of that single file (:func:`~._fetch.fetch_hub`, its own
manifest, so flights of one commit run side by side) or, when a trusted signed
manifest covers the commit, by the swarm (``_swarm_flights``).

Clients are served the contiguous prefix of recorded pieces as it grows. A hub
flight holds back the file's last piece until the whole file matched its
SHA-256 or git blob id and was moved into ``blobs/`` (the pieces themselves
are only hashed as they arrive, not checked against anything signed); a swarm
flight's pieces each matched a signed BLAKE3 hash, so every recorded piece is
served. A file whose bytes do not match is never delivered whole: the
clients' responses are cut short, and for ``failure_ttl`` seconds the flight
answers its error rather than fetching again. A blob a flight completed is
served from disk.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from autoglm.node._engine import FetchOptions, collapse_group
from autoglm.node._mirrors import MirrorConfig
from autoglm.node._progress import Event, PieceVerified
from autoglm.node._store import Store, _staging_dir
from autoglm.node.errors import AutoglmError, IntegrityError, SourceError
from autoglm.protocol._pieces import plan_fixed

from ._api import HubFile, HubRef, RepoSnapshot, parse_ref, resolve_snapshot
from ._cache import link_snapshot, repo_folder, write_ref, write_tree
from ._fetch import HubFetchPlan, fetch_hub

__all__ = ["Flight", "Flights", "FlightSettings", "SwarmFeed", "link_quietly"]

log = logging.getLogger("autoglm.node.hub._gateway")

_MAX_RESOLUTIONS = 4096
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True, slots=True)
class FlightSettings:
    endpoints: tuple[str, ...]
    token: str | None = field(default=None, repr=False)
    cache_dir: Path = Path()
    piece_size: int = 8 << 20
    revision_ttl: float = 10.0
    failure_ttl: float = 30.0


@dataclass(slots=True)
class _Resolution:
    done: trio.Event = field(default_factory=trio.Event)
    snapshot: RepoSnapshot | None = None
    error: Exception | None = None
    at: float = 0.0


class Flight:
    """One file being fetched for all the clients that want it."""

    def __init__(self, repo_dir: Path, f: HubFile, pieces: Sequence[tuple[int, int]], *, hold_last: bool) -> None:
        self.file = f
        self.repo_dir = repo_dir
        self.blob = repo_dir / "blobs" / f.etag
        self.pieces = list(pieces)  # (offset, length) in the file
        self.hold_last = hold_last
        self.recorded: set[int] = set()
        self.contiguous = 0  # pieces recorded from the start
        self.places: list[Path] = []  # where recorded bytes are before the blob is (staging, then the fetch's output)
        self.done = False
        self.error: Exception | None = None
        self.failed_at = 0.0
        self.changed = trio.Event()
        self.also: dict[tuple[str, str], HubFile] = {}  # (commit, path) of other requests for this blob
        self.via = "hub"  # or "swarm"

    @property
    def ready(self) -> int:
        """Bytes that may be served: everything once complete, else the recorded prefix (less the last piece)."""
        if self.done:
            return self.file.size
        if self.contiguous >= len(self.pieces):
            return self.pieces[-1][0] if self.pieces and self.hold_last else self.file.size
        return self.pieces[self.contiguous][0] if self.contiguous else 0

    def bump(self) -> None:
        old, self.changed = self.changed, trio.Event()
        old.set()

    def piece_recorded(self, index: int) -> None:
        """Piece ``index`` of the file is durable at :attr:`places`."""
        self.recorded.add(index)
        moved = False
        while self.contiguous in self.recorded:
            self.contiguous += 1
            moved = True
        if moved:
            self.bump()

    def finish(self, error: Exception | None = None) -> None:
        if error is None:
            self.done = True
        else:
            self.error = error
            self.failed_at = trio.current_time()
        self.bump()

    def open(self) -> int:
        """Worker thread: a descriptor of the file holding the recorded bytes (the blob once complete).

        The staging file is renamed into place (output, then ``blobs/``), so the
        descriptor keeps reading the same bytes while the flight goes on.
        """
        for p in [self.blob] if self.done else [*self.places, self.blob]:
            try:
                return os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue  # moved on meanwhile
        raise OSError(errno.EIO, f"{self.file.path}: the recorded bytes are not readable")


class SwarmFeed(Protocol):
    """Where swarm flights come from (``_swarm_flights.SwarmFlights``)."""

    def look_ahead(self, repo: str) -> None:
        """A revision of ``repo`` was resolved: start finding what covers it."""
        ...

    def expect(self, snap: RepoSnapshot, f: HubFile) -> None:
        """A client asked HEAD for ``f`` (its GET will likely follow)."""
        ...

    def arm(self, snap: RepoSnapshot) -> None:
        """A client resolved the revision (``snapshot_download``): its file requests will follow."""
        ...

    async def cover(self, snap: RepoSnapshot) -> Any:
        """What covers the snapshot's commit (a trusted manifest) or None; waits a bounded time."""
        ...

    def take(self, snap: RepoSnapshot, f: HubFile, repo_dir: Path, cover: Any) -> Flight | None:
        """A flight fed by the swarm when ``cover`` covers ``f``, else None."""
        ...


class Flights:
    """Resolutions and flights, single-flight; runs their fetches in ``nursery``."""

    def __init__(self, store: Store, settings: FlightSettings, nursery: trio.Nursery, *,
                 swarm: SwarmFeed | None = None, on_event: Callable[[str, Event], None] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.nursery = nursery
        self.swarm = swarm
        self.on_event = on_event  # the node's metrics: hub flights' engine events
        self.started = 0
        self.failed = 0
        self.by_via: dict[str, int] = {"hub": 0, "swarm": 0}
        self._resolutions: dict[tuple[str, str], _Resolution] = {}
        self._trees: set[tuple[str, str]] = set()
        self._flights: dict[tuple[str, str], Flight] = {}
        self._mirror_config = MirrorConfig(max_request_bytes=max(2 * settings.piece_size, 4 << 20))
        self._options = FetchOptions(max_consecutive_failures=20)

    # -- resolutions -----------------------------------------------------------
    async def snapshot(self, repo: str, rev: str) -> RepoSnapshot:
        """The repository at ``rev``, resolved once for every request that needs it."""
        ref = parse_ref(f"hf://{repo}", rev)
        key = (ref.repo, ref.revision)
        now = trio.current_time()
        res = self._resolutions.get(key)
        if res is not None and res.done.is_set():
            ttl = 2.0 if res.error is not None else (float("inf") if _COMMIT.match(rev) else self.settings.revision_ttl)
            if now - res.at > ttl:
                res = None
        if res is None:
            if len(self._resolutions) >= _MAX_RESOLUTIONS:  # clients naming endless repos must not grow this forever
                for k in [k for k, r in self._resolutions.items() if r.done.is_set()]:
                    del self._resolutions[k]
            res = self._resolutions[key] = _Resolution()
            self.nursery.start_soon(self._resolve, ref, res)
        await res.done.wait()
        if res.error is not None:
            raise res.error
        assert res.snapshot is not None
        if self.swarm is not None:
            self.swarm.look_ahead(ref.repo)
        return res.snapshot

    async def _resolve(self, ref: HubRef, res: _Resolution) -> None:
        try:
            snap = await resolve_snapshot(ref, self.settings.endpoints, self.settings.token)
            for why in snap.dropped:
                log.warning("gateway: endpoint left out: %s", why)
            repo_dir = repo_folder(self.settings.cache_dir, ref)
            if (ref.repo, snap.commit) not in self._trees:
                await trio.to_thread.run_sync(write_tree, repo_dir, snap.commit, snap.files)
                self._trees.add((ref.repo, snap.commit))
            await trio.to_thread.run_sync(write_ref, repo_dir, ref.revision, snap.commit)
            res.snapshot = snap
            if ref.revision != snap.commit:
                # The commit is now known too: requests pinned to it (snapshot_download's next ones) need no API call.
                pinned = self._resolutions.get((ref.repo, snap.commit))
                if pinned is None or (pinned.done.is_set() and pinned.error is not None):
                    done = _Resolution(snapshot=snap, at=trio.current_time())
                    done.done.set()
                    self._resolutions[(ref.repo, snap.commit)] = done
        except AutoglmError as exc:
            res.error = exc
        except Exception as exc:  # a bug must not hang every waiting client
            log.exception("gateway: resolving %s failed", ref)
            res.error = SourceError(f"resolving {ref} failed: {exc!r}")
        finally:
            res.at = trio.current_time()
            res.done.set()

    # -- flights ---------------------------------------------------------------
    async def flight(self, snap: RepoSnapshot, f: HubFile) -> Flight:
        """The flight of ``f``'s blob: a running one, a completed one, or a new one (swarm first, else the hub)."""
        key = (snap.ref.repo, f.etag)
        fl = self._flights.get(key)
        if fl is not None and (self._stale(fl) or (fl.done and not await trio.to_thread.run_sync(fl.blob.is_file))):
            fl = None  # failed long enough ago, or removed from the cache since
        repo_dir = repo_folder(self.settings.cache_dir, snap.ref)
        if fl is None and self.swarm is not None:
            cover = await self.swarm.cover(snap)  # may wait (bounded) on a name lookup: meanwhile another request may start it
            fl = self._flights.get(key)
            if fl is not None and self._stale(fl):
                fl = None
            if fl is None:
                fl = self.swarm.take(snap, f, repo_dir, cover)
                if fl is not None:
                    self._start(key, snap, fl)
                    return fl
        if fl is None:
            fl = Flight(repo_dir, f, plan_fixed(f.size, self.settings.piece_size), hold_last=True)
            self.nursery.start_soon(self._run_hub, snap, f, fl)
            self._start(key, snap, fl)
        elif fl.done:
            # Another path with the same bytes (one blob): link it as huggingface_hub would.
            await trio.to_thread.run_sync(link_quietly, fl.repo_dir, snap.commit, [f])
        else:
            fl.also[(snap.commit, f.path)] = f  # linked when the flight is done
        return fl

    def _stale(self, fl: Flight) -> bool:
        return fl.error is not None and trio.current_time() - fl.failed_at > self.settings.failure_ttl

    def _start(self, key: tuple[str, str], snap: RepoSnapshot, fl: Flight) -> None:
        self._flights[key] = fl
        self.started += 1
        self.by_via[fl.via] = self.by_via.get(fl.via, 0) + 1
        self.nursery.start_soon(self._after, snap, fl)

    def fall_back(self, snap: RepoSnapshot, f: HubFile, fl: Flight) -> None:
        """A swarm flight that could not start (nothing fetched): the hub fetch feeds the same flight."""
        fl.via, fl.hold_last, fl.places = "hub", True, []
        fl.pieces = plan_fixed(f.size, self.settings.piece_size)
        fl.recorded.clear()
        fl.contiguous = 0
        self.by_via["swarm"] -= 1
        self.by_via["hub"] += 1
        self.nursery.start_soon(self._run_hub, snap, f, fl)

    async def _after(self, snap: RepoSnapshot, fl: Flight) -> None:
        """Once the flight ends: link every path of the commit that has its bytes, or count the failure."""
        while not (fl.done or fl.error is not None):
            await fl.changed.wait()
        if fl.error is not None:
            self.failed += 1
            what = "does not match" if isinstance(fl.error, IntegrityError) else "failed"
            log.warning("gateway: %s@%s %s %s (%s): %s", snap.ref.repo, snap.commit[:12], fl.file.path, what, fl.via, fl.error)
            return
        # Every path of the commit with the same bytes (a client that has the blob asks only HEAD for those),
        # and the paths other requests named meanwhile.
        for x in snap.files:
            if x.etag == fl.file.etag and x.path != fl.file.path:
                fl.also[(snap.commit, x.path)] = x
        for (commit, _), other in list(fl.also.items()):
            await trio.to_thread.run_sync(link_quietly, fl.repo_dir, commit, [other])

    async def _run_hub(self, snap: RepoSnapshot, f: HubFile, fl: Flight) -> None:
        ref = HubRef(snap.ref.hub, snap.ref.repo, snap.commit)  # pinned: the ref file is the resolution's to write
        s = self.settings
        plan = HubFetchPlan(ref=ref, endpoints=snap.endpoints, token=s.token, cache_dir=s.cache_dir,
                            piece_size=s.piece_size, write_tree=False)
        one = RepoSnapshot(ref, snap.commit, (f,), snap.endpoints)
        send, recv = trio.open_memory_channel[Event](256)
        model = f"hf:{ref.repo}@{snap.commit}"

        async def follow() -> None:
            async with recv:
                async for ev in recv:
                    if self.on_event is not None:
                        self.on_event(model, ev)
                    if isinstance(ev, PieceVerified):
                        if not fl.places:
                            fl.places = [_staging_dir(fl.repo_dir, ev.manifest_id) / "0.part"]
                        fl.piece_recorded(ev.index)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                async with send:
                    await fetch_hub(self.store, plan, mirror_config=self._mirror_config, options=self._options,
                                    events=send, snapshot=one)
            fl.finish()
        except Exception as exc:
            err = collapse_group(exc) if isinstance(exc, ExceptionGroup) else exc
            fl.finish(err if isinstance(err, Exception) else SourceError(str(err)))


def link_quietly(repo_dir: Path, commit: str, files: list[HubFile]) -> None:
    try:
        link_snapshot(repo_dir, commit, files)
    except AutoglmError:
        pass
