"""A long-lived swarm node: store + libp2p + swarm + local control API, and fetches that use peers.

``async with open_swarm_node(config) as node:`` starts everything and stops
it all by cancellation on exit; ``await node.hold(plan)`` fetches a
manifest from peers (mirrors only for pieces no peer has) and keeps serving
it afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from autoglm.node._engine import Fetch, FetchResult, _collapse
from autoglm.node._logs import log_model
from autoglm.node._metrics import NodeMetrics, health, serve_metrics
from autoglm.node._mirrors import MirrorSource
from autoglm.node._p2p import DEFAULT_LISTEN, P2PNode, RelayBudget, open_p2p
from autoglm.node._plan import FetchPlan
from autoglm.node._progress import (
    Event,
    FetchDone,
    FileDone,
    PieceVerified,
    ProgressSnapshot,
)
from autoglm.node._store import Download
from autoglm.node.api import Node, NodeConfig, open_node
from autoglm.node.errors import ConfigError, IntegrityError, NoSourceError
from autoglm.node.swarm import Swarm, SwarmConfig, SwarmEvent
from autoglm.protocol import SignedManifest, TrustPolicy, decode_signed_manifest, key_id
from autoglm.protocol._namerecord import ROLLOUT_FULL, NameRecord, sign_name_record

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = ["JoinConfig", "SwarmNode", "fetch_with_peers", "open_swarm_node"]

log = logging.getLogger(__name__)

DISCOVER_FIRST_BOUND = 6.0  # seconds a fetch may wait for swarm membership to settle

_RESOLVE_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class JoinConfig:
    data_dir: Path
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    bootstrap: tuple[str, ...] = ()
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    control_api: bool = True
    mirrors: tuple[str, ...] = ()  # the node's own mirrors (health; SIGHUP reloads them)
    metrics: tuple[str, int] | None = None  # serve /metrics and /healthz here (node/_metrics.py)
    relay: RelayBudget | None = None  # relay circuits for peers behind NAT (join --relay; docs/nat.md)


@dataclass(slots=True)
class _Progress:
    name: str
    version: str
    out_dir: str
    plan: dict[str, Any]
    bytes_done: int = 0
    bytes_total: int = 0
    rate: float = 0.0
    by_source: dict[str, int] = field(default_factory=dict)
    complete: bool = False


class SwarmNode:
    def __init__(self, config: JoinConfig, node: Node, p2p: P2PNode, swarm: Swarm) -> None:
        self.config = config
        self.node = node
        self.p2p = p2p
        self.swarm = swarm
        self.progress: dict[bytes, _Progress] = {}
        self.mirror_urls = config.mirrors
        self.trust: TrustPolicy | None = None  # the operator's trust (join's flags/config), for plans that name none
        self.mirrors: dict[str, MirrorSource] = {}  # each mirror's latest source: its score, for metrics and health
        self.metrics: NodeMetrics | None = None
        self.metrics_addr: tuple[str, int] | None = None
        self._active = 0  # holds still fetching; drain() waits for none
        self._fetches: set[Fetch] = set()  # the running fetches drain() stops
        self._idle = trio.Event()
        self._idle.set()
        self.follow_hooks: list[Callable[[NameRecord], None]] = []  # join --follow (node/_follow.py)
        p2p.on_name_record(self._name_record_seen)

    def _name_record_seen(self, rec: NameRecord) -> None:
        for hook in self.follow_hooks:
            hook(rec)

    async def hold(
        self,
        plan: FetchPlan,
        *,
        events: trio.MemorySendChannel[Event] | None = None,
        before_start: Callable[[bytes], Awaitable[None]] | None = None,
        task_status: TaskStatus[Fetch] = trio.TASK_STATUS_IGNORED,
    ) -> FetchResult:
        """Fetch what the plan misses (peers first, mirrors for the rest), then keep serving it.

        ``events`` gets the engine's progress events and is closed at the end;
        ``before_start(manifest_id)`` (bounded by the caller) runs once the
        manifest is announced and attached and its holders found, before the
        first request (an update waits for the rest of the fleet: node/_follow.py);
        ``task_status.started`` hands over the running :class:`Fetch`.
        """
        t0 = trio.current_time()
        plan = self._with_node_defaults(plan)
        try:
            signed, download = await self.node.open_download(plan)
        except BaseException:
            if events is not None:
                await events.aclose()
            raise
        m = download.manifest
        self._active += 1
        self._idle = trio.Event() if self._active == 1 else self._idle
        try:
            with log_model(f"{m.name}@{m.version}"):
                return await self._hold(plan, signed, download, events, task_status, t0, before_start)
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def _with_node_defaults(self, plan: FetchPlan) -> FetchPlan:
        """A plan that names no mirror (no trusted key or root) gets the node's own (SIGHUP reloads them)."""
        if not plan.mirrors and self.mirror_urls:
            plan = dataclasses.replace(plan, mirrors=self.mirror_urls)
        if self.trust is not None and not plan.trust.keys and not plan.trust.roots:
            plan = dataclasses.replace(plan, trust=self.trust)
        return plan

    async def drain(self) -> None:
        """Stop every running fetch at its pieces in flight; return once those are verified and recorded.

        SIGTERM waits for this, bounded, before stopping: no new piece starts,
        and the ones arriving finish (Fetch.drain), so a restart resumes with
        nothing half-received.
        """
        fetches = list(self._fetches)
        for f in fetches:
            f.drain()
        for f in fetches:
            await f.drained()

    async def _hold(
        self,
        plan: FetchPlan,
        signed: SignedManifest,
        download: Download,
        events: trio.MemorySendChannel[Event] | None,
        task_status: TaskStatus[Fetch],
        t0: float,
        before_start: Callable[[bytes], Awaitable[None]] | None = None,
    ) -> FetchResult:
        m = download.manifest
        mid = download.manifest_id
        log.info("fetch of %s %s (%s) requested", m.name, m.version, mid.hex()[:16])
        if self.swarm.fetching(mid):
            # One fetch per manifest at a time: peers are sources of exactly one fetch.
            await trio.to_thread.run_sync(download.close)
            if events is not None:
                await events.aclose()
            raise ConfigError(f"this node is already fetching {m.name} {m.version}; wait for it to finish")
        self.swarm.start_holding(mid, m.piece_count, download.done, signed.encode())
        prog = self.progress[mid] = _Progress(m.name, m.version, str(download.out_dir), plan.describe(),
                                              bytes_total=download.total_bytes)
        # Peers on a LAN deliver a piece in tens of milliseconds: an endgame
        # duplicate only for a request a second old (docs/protocol.md).
        plan = plan.with_options(mirror_overlap_budget=0, wait_for_sources=True, swarm_id=self.p2p.peer_id, endgame_delay=1.0)
        send, recv = trio.open_memory_channel[Event](256)
        mirrors = self.node.mirror_sources(plan)
        self.mirrors.update((s.base_url, s) for s in mirrors)
        fetch = Fetch(self.node.store, download, mirrors, send, plan.options,
                      on_mirror_claims=lambda indices: self.swarm.post_claims(mid, indices))
        box: list[FetchResult] = []
        self._fetches.add(fetch)

        go = trio.Event()

        async def runner() -> None:
            async with send:
                box.append(await fetch.run(go=go))

        try:
            # Peers first: sources known before the first request keep the
            # mirrors to pieces that no peer has.
            self.swarm.attach(mid, fetch)
            task_status.started(fetch)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, recv, mid, prog, events)
                nursery.start_soon(runner)  # prepares (recovery, local copies) while peers are found
                if download.missing():
                    # Until membership is quiet (docs/protocol.md); the bound only
                    # matters while many nodes start at once on a loaded host.
                    with trio.move_on_after(DISCOVER_FIRST_BOUND):
                        await self.swarm.discover_first(mid)
                    if before_start is not None:
                        await before_start(mid)
                    log.info("%s: %d holder(s) known %.2f s after the request; fetching", mid.hex()[:16],
                             len(self.swarm.holders(mid)), trio.current_time() - t0)
                go.set()
        except BaseExceptionGroup as eg:
            raise _collapse(eg) from None
        finally:
            self._fetches.discard(fetch)
            self.swarm.detach(mid)
            if events is not None:
                await events.aclose()
        prog.complete = True
        prog.bytes_done = prog.bytes_total
        log.info("%s: complete %.2f s after the request", mid.hex()[:16], trio.current_time() - t0)
        await self.swarm.refresh_held(mid)
        return box[0]

    async def _pump(
        self,
        recv: trio.MemoryReceiveChannel[Event],
        mid: bytes,
        prog: _Progress,
        out: trio.MemorySendChannel[Event] | None,
    ) -> None:
        async with recv:
            async for ev in recv:
                if self.metrics is not None:
                    self.metrics.observe(f"{prog.name}@{prog.version}", ev)
                _log_event(ev)
                if isinstance(ev, PieceVerified):
                    self.swarm.piece_verified(mid, ev.index)
                    prog.bytes_done += ev.nbytes
                elif isinstance(ev, ProgressSnapshot):
                    prog.bytes_done, prog.rate, prog.by_source = ev.bytes_done, ev.rate, dict(ev.by_source)
                elif isinstance(ev, FetchDone):
                    prog.by_source = dict(ev.bytes_by_source)
                if out is not None:
                    try:
                        out.send_nowait(ev)
                    except trio.WouldBlock:
                        if not isinstance(ev, ProgressSnapshot):
                            await out.send(ev)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        out = None

    async def publish_name(
        self, key: Ed25519PrivateKey, signed: SignedManifest, seq: int | None = None, rollout: int = ROLLOUT_FULL
    ) -> NameRecord:
        """Point NAME (the manifest's name) at this manifest in the DHT, signed by the publisher key.

        ``seq`` defaults to the manifest's ``created_at``, so a later publish
        wins; ``rollout`` (ppm) below ROLLOUT_FULL stages it. The record is
        also pushed to session peers, so followers among them pick it up at
        once (node/_follow.py).
        """
        m = signed.manifest
        rec = sign_name_record(key, m.name, signed.id, m.version, m.created_at if seq is None else seq, rollout)
        if rec.public_key != signed.public_key:
            raise ConfigError("the name record key must be the key that signed the manifest")
        self.swarm.start_holding(signed.id, m.piece_count, (), signed.encode())
        await self.p2p.put_name_record(rec)
        await self.p2p.push_name_record(rec, self.p2p.connected_peers())
        return rec

    async def resolve_record(self, name: str, trust: TrustPolicy) -> NameRecord:
        """The valid name record with the highest seq among the trusted publisher keys' (DHT)."""
        best: NameRecord | None = None
        for pub in sorted(trust.keys):
            rec = await self.p2p.get_name_record(key_id(pub), name)
            if rec is not None and (best is None or rec.seq > best.seq):
                best = rec
        if best is None:
            raise NoSourceError(f"no name record for {name!r} by a trusted publisher key in the DHT")
        return best

    async def manifest_for(self, rec: NameRecord) -> SignedManifest:
        """The signed manifest a record points at, from a peer that holds it."""
        with trio.move_on_after(_RESOLVE_TIMEOUT):
            envelope = await self.swarm.fetch_manifest(rec.manifest_id)
            signed = decode_signed_manifest(envelope)
            if signed.id != rec.manifest_id:
                raise IntegrityError("a peer sent a manifest that does not match the name record")
            return signed
        raise NoSourceError(f"{rec.name!r} resolves to manifest {rec.manifest_id.hex()[:16]} but no peer sent it")

    async def resolve_name(self, name: str, trust: TrustPolicy) -> SignedManifest:
        """The latest manifest named NAME by a trusted publisher key, fetched from peers.

        Raises NoSourceError when no trusted record or no peer with the manifest is found.
        """
        return await self.manifest_for(await self.resolve_record(name, trust))

    def status(self) -> dict[str, Any]:
        st = self.swarm.status()
        st["models"] = {
            mid.hex(): {
                "name": p.name,
                "version": p.version,
                "out_dir": p.out_dir,
                "plan": p.plan,
                "bytes_done": p.bytes_done,
                "bytes_total": p.bytes_total,
                "rate": round(p.rate, 1),
                "bytes_by_source": p.by_source,
                "complete": p.complete,
            }
            for mid, p in self.progress.items()
        }
        st["health"] = health(self)
        return st


def _log_event(ev: Event) -> None:
    """One log line per engine event (the model comes from the fetch's log context).

    Source failures are not here: the engine logs each where it happens.
    """
    if isinstance(ev, PieceVerified):
        log.debug("piece %d verified (%d bytes, %s) from %s", ev.index, ev.nbytes, ev.path, ev.source_id)
    elif isinstance(ev, FileDone):
        log.info("file %s done (%d bytes)", ev.path, ev.size)
    elif isinstance(ev, FetchDone):
        log.info("fetch done: %d bytes in %.2f s, %d refetched", ev.bytes_total, ev.seconds, ev.refetched_bytes)


@asynccontextmanager
async def open_swarm_node(
    config: JoinConfig, events: trio.MemorySendChannel[SwarmEvent] | None = None
) -> AsyncIterator[SwarmNode]:
    """Start the store, the libp2p host, the swarm and the control API; stop them on exit.

    ``events`` receives the swarm's own events (DHT announcements, bans).
    """
    from autoglm.node._control_api import serve_control_api
    from autoglm.node._control_client import connect

    running = connect(config.data_dir) if config.control_api else None  # a unix socket: answers at once
    if running is not None:
        running.close()
        raise ConfigError(f"a node is already running with data directory {config.data_dir}; use another --data-dir")
    async with open_node(NodeConfig(config.data_dir)) as node:
        async with open_p2p(config.data_dir, config.listen, config.bootstrap, config.relay) as p2p:
            swarm = Swarm(p2p, node.store, config.swarm, events)
            async with trio.open_nursery() as nursery:
                await nursery.start(swarm.run)
                sn = SwarmNode(config, node, p2p, swarm)
                if config.control_api:
                    await nursery.start(serve_control_api, sn, config.data_dir)
                if config.metrics is not None:
                    sn.metrics = NodeMetrics(sn)
                    sn.metrics_addr = await nursery.start(serve_metrics, sn, sn.metrics, *config.metrics)
                yield sn
                nursery.cancel_scope.cancel()


async def fetch_with_peers(
    config: JoinConfig,
    plan: FetchPlan,
    *,
    events: trio.MemorySendChannel[Event] | None = None,
    task_status: TaskStatus[Fetch] = trio.TASK_STATUS_IGNORED,
) -> FetchResult:
    """An ephemeral node for one fetch: joins through ``config.bootstrap``, uses peers
    and mirrors, serves while it runs, and stops when the fetch is done.

    For ``autoglm-node fetch`` when no ``join`` node runs on this data directory
    (with one running, send the control API's ``fetch`` op instead).
    """
    async with open_swarm_node(
        JoinConfig(config.data_dir, config.listen, config.bootstrap, config.swarm, control_api=False)
    ) as node:
        return await node.hold(plan, events=events, task_status=task_status)
