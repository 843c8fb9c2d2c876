"""Gateway flights fed by the swarm: a trusted ``publish hf://`` manifest covers the repository and commit.

``join --hf-gateway … --hf-manifest M.agm`` (a file with its ``M.agm.hub.json``
beside it, or a folder of them) gives the gateway signed manifests of Hub
commits. Each is checked at start: the manifest's signature against the node's
trust, the provenance's signature, manifest id and key (``load_provenance``).

When a client asks for a file of a covered ``(repo, commit)`` and the
manifest agrees with the Hub's listing for that file (size; the LFS SHA-256 is
the manifest's signed SHA-256; a small file's git blob id is the signed
provenance's), the flight is fed by the node's swarm fetch
(``SwarmNode.hold``): peers first, the Hub endpoints as web seeds (the signed
provenance's, then the gateway's own upstreams), every piece checked against
its signed BLAKE3 hash, so every recorded piece is streamed at once.

Requests for files of one manifest arriving together (``snapshot_download``
asks with 8 workers) are batched into one hold with those files (a hold starts
once no new file was asked for ``BATCH_WINDOW`` seconds, at most ``BATCH_MAX``
after the first). Two refinements: once every file of the manifest was asked
for, nothing can come later, so the hold starts ``BATCH_QUICK`` seconds after
the last request; and a file a client asked ``HEAD`` for in the last
``BATCH_MAX`` seconds (``hf_hub_download`` sends ``HEAD`` before ``GET``) is
waited for past the window, up to ``BATCH_MAX``, since its ``GET`` is on its
way (on a busy machine one worker's ``HEAD`` can come after another's ``GET``).
Files asked for while a hold runs go into the next (the node runs one fetch per manifest
at a time; the store keeps what earlier holds verified).

*Armed holds*: ``snapshot_download`` (``hf download``) first resolves the
revision (model info, or the recursive tree listing when it names a commit),
and only then asks for files, after a ``HEAD`` each. Nodes whose clients
start together then began their swarm fetches up to a second or two apart,
each ranking the first copy over the nodes it knew at its start; every node
that joined later moved owners, and the mirror requests in flight for moved
pieces were origin egress thrown away (1.24-1.50x at 64 MiB,
docs/benchmarks.md). So the revision call *arms* the covering manifest's
hold: the hold of every file of the manifest starts at once (announced,
attached, its holders found: the node is a member of the manifest's swarm
from then on), and its ``before_start`` waits for the client's requests,
gathered as above, and for the peers in session to arm theirs (at most
``ARM_FLEET`` seconds after the call, ``ARM_FLEET_MAX`` while another peer
is fetching the manifest too). When they ask for every file the hold goes on as the batch; when they ask for some files only (``--include``), or for none within
``ARM_WAIT`` seconds, it stands down before its first request (no byte was
fetched) and the files asked for get an ordinary hold. The files land in
``models--ORG--REPO/.autoglm-files/<commit>/`` (the folder the node keeps
seeding from, as ``fetch M.agm --hf-cache`` writes it) and each blob is a hard
link to its file: one copy on disk. A hold that cannot start (the manifest is
already being fetched, e.g. by ``--seed``) or fails before a flight got any
byte hands that flight to the hub fetch.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from autoglm.node._engine import FetchOptions, collapse_group
from autoglm.node._manifests import check_manifest, load_signed_manifest
from autoglm.node._plan import FetchPlan
from autoglm.node._progress import Event, FileDone, PieceVerified
from autoglm.node._store import _staging_dir
from autoglm.node.errors import AutoglmError, ConfigError, IntegrityError, SourceError
from autoglm.protocol import SignedManifest, TrustPolicy

from ._api import HubFile, RepoSnapshot
from ._cache import link_snapshot
from ._flights import Flight
from ._names import NameCovers
from ._publish import (
    SIDECAR_SUFFIX,
    Provenance,
    files_dir,
    link_blob,
    load_provenance,
    mirror_base,
    sidecar_path,
)

__all__ = ["ARM_FLEET", "ARM_FLEET_MAX", "ARM_WAIT", "BATCH_MAX", "BATCH_QUICK", "BATCH_WINDOW", "HubManifest", "SwarmFlights", "load_hub_manifests",
           "swarm_fleet"]

log = logging.getLogger("autoglm.node.hub._gateway")

BATCH_WINDOW = 0.3  # a new hold starts once no new file of its manifest was asked for this long ...
BATCH_MAX = 2.0  # ... or this long after its first request
BATCH_QUICK = 0.05  # ... or this long once every file of the manifest was asked for
ARM_WAIT = 5.0  # an armed hold (started at the revision call) waits this long for the client's first file request
ARM_FLEET = 2.0  # ... and, its batch gathered, until every peer in session holds the manifest, at most this long after the call
ARM_FLEET_MAX = 5.0  # ... or this long while another peer in session is fetching it too (a fleet is starting)

Hold = Callable[..., Awaitable[Any]]  # SwarmNode.hold(plan, events=...)
# manifest id -> (peers in session fetching it, peers in session that hold or fetch it, peers in session)
Fleet = Callable[[bytes], tuple[int, int, int]]


def swarm_fleet(swarm: Any) -> Fleet:
    """The :data:`Fleet` of a node's ``Swarm``: what its sessions announced."""

    def fleet(mid: bytes) -> tuple[int, int, int]:
        sessions = list(swarm.sessions.values())
        bfs = [s.bitfield(mid) for s in sessions]
        return sum(1 for b in bfs if b is not None and not b.complete), sum(1 for b in bfs if b is not None), len(sessions)

    return fleet


@dataclass(frozen=True, slots=True)
class HubManifest:
    """A trusted signed manifest of a Hub commit, with its checked provenance (``--hf-manifest``).

    Found through the name record instead (``_names``), it has neither a file
    nor a provenance: its signed name ``hf:ORG/REPO`` and version (the commit)
    say what it covers, and the gateway's own upstreams are its web seeds.
    """

    path: Path | None
    signed: SignedManifest
    provenance: Provenance | None = None

    @property
    def repo(self) -> str:
        return self.provenance.repo if self.provenance is not None else self.signed.manifest.name.removeprefix("hf:")

    @property
    def commit(self) -> str:
        return self.provenance.commit if self.provenance is not None else self.signed.manifest.version

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"manifest {self.signed.id.hex()[:16]} (name record {self.signed.manifest.name})"


def load_hub_manifests(paths: Sequence[Path], trust: TrustPolicy) -> tuple[HubManifest, ...]:
    """Each path: a manifest with its ``.hub.json`` beside it, or a folder of them. ConfigError on anything else."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(x for x in p.iterdir() if x.is_file() and sidecar_path(x).is_file())
        elif p.is_file():
            if not sidecar_path(p).is_file():
                raise ConfigError(f"--hf-manifest {p}: no {p.name}{SIDECAR_SUFFIX} beside it (made by publish hf://)")
            found.append(p)
        else:
            raise ConfigError(f"--hf-manifest {p}: no such file or folder")
    out: list[HubManifest] = []
    for p in found:
        signed = load_signed_manifest(p)
        try:
            check_manifest(signed, trust)
        except AutoglmError as exc:
            raise ConfigError(f"--hf-manifest {p}: not trusted: {exc}") from exc
        out.append(HubManifest(p, signed, load_provenance(sidecar_path(p), signed)))
    return tuple(out)


@dataclass(slots=True)
class _Run:
    """The holds of one manifest: requests waiting for the next one, and every file asked for so far."""

    manifest: HubManifest
    pending: dict[str, tuple[Flight, HubFile, RepoSnapshot]] = field(default_factory=dict)
    wanted: set[str] = field(default_factory=set)
    expected: dict[str, float] = field(default_factory=dict)  # asked HEAD for (when), not in a hold yet: GETs to come
    running: bool = False
    asked: trio.Event = field(default_factory=trio.Event)  # set when a file joins ``pending``


class _StandDown(Exception):
    """An armed hold's client asked for part of the manifest only, or for nothing: the hold ends before its first request."""


class SwarmFlights:
    """Flights of covered commits, run through the node's swarm fetch (see the module docstring)."""

    def __init__(self, manifests: Sequence[HubManifest], hold: Hold, *, cache_dir: Path, trust: TrustPolicy,
                 endpoints: Sequence[str], token: str | None, nursery: trio.Nursery,
                 fall_back: Callable[[RepoSnapshot, HubFile, Flight], None], names: NameCovers | None = None,
                 fleet: Fleet | None = None) -> None:
        self.hold = hold
        self.fleet = fleet
        self.cache_dir = cache_dir
        self.trust = trust
        self.endpoints = tuple(endpoints)
        self._token = token
        self.nursery = nursery
        self.fall_back = fall_back
        self.manifests = {(m.repo, m.commit): m for m in manifests}
        self.names = names
        self._by_name: dict[bytes, HubManifest] = {}
        self._runs: dict[bytes, _Run] = {}

    def look_ahead(self, repo: str) -> None:
        """A revision of ``repo`` was resolved: start its name lookup now, beside the clients' next requests."""
        if self.names is not None and not any(r == repo for r, _ in self.manifests):
            self.names.look_ahead(repo)  # (a repository --hf-manifest covers is looked up only for other commits)

    async def cover(self, snap: RepoSnapshot) -> HubManifest | None:
        """The trusted manifest covering the snapshot's commit: ``--hf-manifest``, else the name record's (bounded wait)."""
        hm = self.manifests.get((snap.ref.repo, snap.commit))
        if hm is not None or self.names is None or snap.ref.hub != "hf":
            return hm
        signed = await self.names.covering(snap.ref.repo, snap.commit)
        if signed is None:
            return None
        return self._by_name.setdefault(signed.id, HubManifest(None, signed))

    def arm(self, snap: RepoSnapshot) -> None:
        """A client resolved the revision (``snapshot_download``'s first call): arm the covering manifest's hold."""
        self.nursery.start_soon(self._arm, snap)

    async def _arm(self, snap: RepoSnapshot) -> None:
        hm = await self.cover(snap)
        if hm is None:
            return
        run = self._runs.setdefault(hm.signed.id, _Run(hm))
        if run.running or run.wanted.issuperset(e.path for e in hm.signed.manifest.files):
            return  # a hold runs (its files' requests batch as usual), or the holds so far had every file
        run.running = True
        self.nursery.start_soon(self._run, run, True)

    def expect(self, snap: RepoSnapshot, f: HubFile) -> None:
        """A client asked HEAD for ``f``: its GET will likely follow, so a hold being gathered waits for it."""
        hm = self.manifests.get((snap.ref.repo, snap.commit)) or next(
            (m for m in self._by_name.values() if (m.repo, m.commit) == (snap.ref.repo, snap.commit)), None)
        if hm is None or all(e.path != f.path for e in hm.signed.manifest.files):
            return  # a file outside the manifest goes to the hub: no batch waits for it
        run = self._runs.setdefault(hm.signed.id, _Run(hm))
        if f.path not in run.wanted and f.path not in run.pending and len(run.expected) < 4096:
            run.expected[f.path] = trio.current_time()
            run.asked.set()  # a batch being gathered looks again: it now waits for this GET too

    def take(self, snap: RepoSnapshot, f: HubFile, repo_dir: Path, hm: HubManifest | None) -> Flight | None:
        """A swarm flight of ``f`` if ``hm`` covers it and agrees with the hub's listing, else None."""
        if hm is None:
            return None
        entry = next((e for e in hm.signed.manifest.files if e.path == f.path), None)
        # A small file's git blob id: the signed provenance's; without one (a name record's manifest) it is
        # checked against the hub's listing from the verified bytes before the blob is linked (_link_blob).
        blob_ok = hm.provenance is None or any(p.path == f.path and p.blob_id == f.blob_id for p in hm.provenance.files)
        if entry is None or entry.size != f.size or (entry.sha256.hex() != f.sha256 if f.sha256 is not None else not blob_ok):
            log.warning("gateway: %s@%s %s: the signed manifest %s disagrees with the hub's listing; fetching from the hub",
                        snap.ref.repo, snap.commit[:12], f.path, hm)
            return None
        fl = Flight(repo_dir, f, [(p.offset, p.length) for p in entry.pieces], hold_last=False)
        fl.via = "swarm"
        run = self._runs.setdefault(hm.signed.id, _Run(hm))
        run.pending[f.path] = (fl, f, snap)
        run.asked.set()
        if not run.running:
            run.running = True
            self.nursery.start_soon(self._run, run)
        return fl

    async def _run(self, run: _Run, armed: bool = False) -> None:
        try:
            gathered = await self._armed(run) if armed else False
            while run.pending:
                if not gathered:
                    await self._gather(run)
                gathered = False
                batch, run.pending = run.pending, {}
                run.wanted |= set(batch)
                for p in batch:
                    run.expected.pop(p, None)
                await self._hold(run, batch, tuple(sorted(run.wanted)))
        finally:
            run.running = False

    async def _gather(self, run: _Run) -> None:
        """Until the requests of a batch stop arriving (the windows of the module docstring)."""
        # The other requests of one snapshot_download (8 workers) arrive meanwhile; on a busy machine
        # they spread over more than a window, and a file left for the next hold waits for this one.
        with trio.move_on_after(BATCH_MAX):
            while True:
                run.asked = trio.Event()
                with trio.move_on_after(self._window(run)):
                    await run.asked.wait()
                if not run.asked.is_set():
                    break

    async def _armed(self, run: _Run) -> bool:
        """The hold of the whole manifest, started at the revision call; it fetches once its client asks for it all.

        True when it stood down after gathering its client's requests (they get an ordinary hold at once).
        """
        every = tuple(sorted(e.path for e in run.manifest.signed.manifest.files))
        batch: dict[str, tuple[Flight, HubFile, RepoSnapshot]] = {}
        t0 = trio.current_time()
        stood_down: list[str] = []

        async def before_start(mid: bytes) -> None:
            with trio.move_on_after(max(ARM_WAIT - (trio.current_time() - t0), 0.0)):
                while not run.pending:
                    run.asked = trio.Event()
                    await run.asked.wait()
            if run.pending:
                await self._gather(run)
            if not self._asked_all(run):
                why = "no file asked for" if not run.pending else f"{len(run.pending)} of {len(every)} file(s) asked for"
                stood_down.append(why)
                raise _StandDown(why)
            fleet = ""
            if self.fleet is not None:
                # The peers this node is in session with are likely its fleet (the nodes given each other to
                # join), their clients started with ours: wait for those to arm too, so that every node ranks
                # the first copy over the same members from its first request (bounded: most peers of a large
                # network never fetch this manifest; longer once another peer fetches it too: on a loaded
                # machine 4 clients started together resolved the revision up to 4 s apart).
                while True:
                    fetching, holders, peers = self.fleet(mid)
                    fleet = f"; {holders} of {peers} peer(s) in session hold it, {fetching} fetching"
                    if holders >= peers or trio.current_time() >= t0 + (ARM_FLEET_MAX if fetching else ARM_FLEET):
                        break
                    await trio.sleep(0.05)
            batch.update(run.pending)
            run.pending = {}
            run.wanted |= set(batch)
            run.expected.clear()
            log.info("gateway: %s@%s: %d file(s) from the swarm (%s; the hold armed %.2f s before, at the revision call%s)",
                     run.manifest.repo, run.manifest.commit[:12], len(batch), ", ".join(sorted(batch)),
                     trio.current_time() - t0, fleet)

        log.info("gateway: %s@%s: revision resolved; the hold of its %d file(s) is armed (waits for the client's requests)",
                 run.manifest.repo, run.manifest.commit[:12], len(every))
        await self._hold(run, batch, every, before_start=before_start, stood_down=stood_down)
        if stood_down:
            log.info("gateway: %s@%s: the armed hold stood down before any request (%s)", run.manifest.repo,
                     run.manifest.commit[:12], stood_down[0])
        return bool(stood_down) and bool(run.pending)

    @staticmethod
    def _asked_all(run: _Run) -> bool:
        """Every file of the manifest was asked for (a file with the same bytes as one asked for counts: one flight per blob)."""
        files = run.manifest.signed.manifest.files
        asked = run.wanted.union(run.pending)
        blobs = {(e.sha256, e.size) for e in files if e.path in asked}
        return all(e.path in asked or (e.sha256, e.size) in blobs for e in files)

    @staticmethod
    def _window(run: _Run) -> float:
        """How long a batch being gathered waits for the next request (see the module docstring)."""
        if SwarmFlights._asked_all(run):
            return BATCH_QUICK  # the whole manifest: nothing more can come
        now = trio.current_time()
        for p, t in list(run.expected.items()):
            if now - t >= BATCH_MAX:
                del run.expected[p]  # a HEAD with no GET (the client had the file): forgotten
            elif p not in run.pending:
                return BATCH_MAX  # its GET is on its way (bounded by BATCH_MAX after the first request)
        return BATCH_WINDOW

    def _plan(self, run: _Run, files: tuple[str, ...]) -> FetchPlan:
        hm = run.manifest
        mirrors = list(hm.provenance.mirrors) if hm.provenance is not None else []
        own = [mirror_base(ep, hm.repo, hm.commit) for ep in self.endpoints]
        mirrors += [m for m in own if m not in mirrors]
        headers = {m: {"Authorization": f"Bearer {self._token}"} for m in own} if self._token else {}
        # Clients wait on these files and are served the front of each as it
        # grows: the streaming order (picker rule 6) fetches the fronts first.
        return FetchPlan(hm.signed, files_dir(self.cache_dir, hm.repo, hm.commit), self.trust, mirrors=tuple(mirrors),
                         mirror_headers=headers, files=files, options=FetchOptions(stream=True))

    async def _hold(self, run: _Run, batch: dict[str, tuple[Flight, HubFile, RepoSnapshot]], files: tuple[str, ...], *,
                    before_start: Callable[[bytes], Awaitable[None]] | None = None, stood_down: Sequence[str] = ()) -> None:
        """The swarm fetch of ``files``, feeding the flights of ``batch`` (an armed hold's ``before_start`` fills it)."""
        m = run.manifest.signed.manifest
        plan = self._plan(run, files)
        out = plan.out
        first: dict[str, tuple[int, int]] = {}  # path -> (file index, its first piece's index)
        n = 0
        for fi, e in enumerate(m.files):
            first[e.path] = (fi, n)
            n += len(e.pieces)
        send, recv = trio.open_memory_channel[Event](256)
        t0 = trio.current_time()

        early: list[Event] = []  # an armed hold's events before its batch is known (pieces the node had)
        waiting = [before_start is not None]

        async def on_event(ev: Event) -> None:
            if isinstance(ev, PieceVerified) and ev.path in batch:
                fl = batch[ev.path][0]
                fi, start = first[ev.path]
                if not fl.places:
                    fl.places = [_staging_dir(out, ev.manifest_id) / f"{fi}.part", out / ev.path]
                streamable = fl.ready
                fl.piece_recorded(ev.index - start)
                eighth = max(fl.file.size // 8, 1)  # the prefix's progress in eighths of the file
                if (not streamable and fl.ready) or streamable // eighth < fl.ready // eighth < 8:
                    log.info("gateway: %s: first %d byte(s) streamable %.2fs into the swarm fetch (%d of %d pieces)",
                             ev.path, fl.ready, trio.current_time() - t0, len(fl.recorded), len(fl.pieces))
            elif isinstance(ev, FileDone) and ev.path in batch:
                log.info("gateway: %s: every piece verified %.2fs into the swarm fetch", ev.path,
                         trio.current_time() - t0)
                await self._complete(out, *batch[ev.path])

        async def follow() -> None:
            async with recv:
                async for ev in recv:
                    if waiting[0] and isinstance(ev, PieceVerified | FileDone):
                        early.append(ev)
                    else:
                        await on_event(ev)

        async def start(mid: bytes) -> None:
            nonlocal t0
            assert before_start is not None
            await before_start(mid)
            t0 = trio.current_time()
            waiting[0] = False
            for ev in early:
                await on_event(ev)
            early.clear()

        if before_start is None:
            log.info("gateway: %s@%s: %d file(s) from the swarm (%s)", run.manifest.repo,
                     run.manifest.commit[:12], len(batch), ", ".join(sorted(batch)))
        error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                if before_start is None:
                    await self.hold(plan, events=send)
                else:
                    await self.hold(plan, events=send, before_start=start)
        except Exception as exc:
            err = collapse_group(exc) if isinstance(exc, ExceptionGroup) else exc
            error = err if isinstance(err, Exception) else SourceError(f"the swarm fetch failed: {err!r}")
            if not stood_down:
                log.warning("gateway: the swarm fetch of %s failed: %s", run.manifest, error)
        for fl, f, snap in batch.values():
            if fl.done or fl.error is not None:
                continue
            if error is None:
                await self._complete(out, fl, f, snap)
            elif not fl.recorded:
                self.fall_back(snap, f, fl)  # nothing from the swarm yet: the hub fetch feeds this flight
            else:
                fl.finish(error)

    async def _complete(self, out: Path, fl: Flight, f: HubFile, snap: RepoSnapshot) -> None:
        if fl.done or fl.error is not None:
            return
        try:
            await trio.to_thread.run_sync(_link_blob, out / f.path, fl, f, snap.commit)
        except (AutoglmError, OSError) as exc:
            fl.finish(exc if isinstance(exc, AutoglmError) else SourceError(f"{f.path}: {exc}"))
            return
        fl.finish()


def _link_blob(src: Path, fl: Flight, f: HubFile, commit: str) -> None:
    """``blobs/<etag>`` as a hard link to the verified file (a copy across file systems), and the snapshot link."""
    if f.sha256 is None:  # a small file: its blob id from the verified bytes, not from any listing
        data = src.read_bytes()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
        if blob != f.blob_id:
            raise IntegrityError(f"{f.path}: git blob id {blob}, the hub says {f.blob_id}")
    dst = fl.blob
    link_blob(src, dst)
    link_snapshot(fl.repo_dir, commit, [f])
