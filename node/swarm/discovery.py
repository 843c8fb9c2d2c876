"""Finding peers: DHT lookups for wanted manifests and files, the wait before a fetch starts,
provider records with pacing, and signed manifests fetched from peers by id.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from autoglm.node._p2p import P2PNode
from autoglm.protocol import decode_signed_manifest
from autoglm.protocol._control import GetManifest, ManifestData
from autoglm.protocol._errors import RemoteProtocolError

from .config import Announced, SwarmConfig, SwarmEvent
from .dialer import Dialer
from .fetches import Fetches
from .held import Held
from .session import Session

__all__ = ["Discovery"]

log = logging.getLogger("autoglm.node.swarm")

# Receivers drop ADD_PROVIDER beyond 10 per 10 s per peer, silently: at most 8 per 10 s.
_PROVIDE_WINDOW, _PROVIDE_MAX = 10.0, 8


class Discovery:
    """DHT lookups and announcements, and the swarm's "peers changed" signal."""

    def __init__(
        self, p2p: P2PNode, config: SwarmConfig, dialer: Dialer, fetches: Fetches, held: Held,
        emit: Callable[[SwarmEvent], None],
    ) -> None:
        self._p2p = p2p
        self._config = config
        self._dialer = dialer
        self._fetches = fetches
        self._held = held
        self._emit = emit
        self._provided: dict[bytes, tuple[float, int]] = {}
        self._provided_files: set[bytes] = set()
        self._provide_times: list[float] = []
        self._awaited: set[bytes] = set()  # envelopes fetch_manifest waits for (the only ones kept whole)
        self._wanted_changed = trio.Event()
        # Set and replaced whenever a peer says Hello, Announce or sends a manifest;
        # waiters take the current event first, then check their condition.
        self._peers_changed = trio.Event()

    def peers_changed(self) -> None:
        self._peers_changed.set()
        self._peers_changed = trio.Event()

    def forget(self, mid: bytes) -> None:
        """``mid`` is no longer held: provide it afresh if it ever is again."""
        self._provided.pop(mid, None)

    def wanted_changed(self) -> None:
        self._wanted_changed.set()

    # -- lookups -----------------------------------------------------------------
    async def discover(self, mid: bytes) -> None:
        # Peers we are already connected to over libp2p (bootstrap peers, DHT
        # neighbours) get a session first when nobody holding the manifest is
        # known yet: a Hello costs one round trip (and a bootstrap node
        # introduces the holders it knows), a DHT lookup several.
        if not self._dialer.holders(mid):
            await self._dialer.dial_all(self._p2p.connected_peers())
        await self._dialer.dial_all(await self._p2p.find_manifest_providers(mid))

    async def discover_first(self, mid: bytes) -> None:
        """Before a fetch starts: find peers holding ``mid`` and wait for their Hellos.

        Peers known before the first request keep mirrors to the pieces no
        peer has, and share the first copy (picker rule 6); a mirror request
        withdrawn later, because its piece turned out to be another node's,
        is origin egress thrown away. So: open sessions with the peers we are
        already connected to (the bootstrap nodes, which introduce every
        other holder they know with ``Peers``), look the manifest up in the
        DHT in the background, and return once membership has been stable
        for ``discover_settle`` seconds: no session still waiting for its Hello, no
        introduced peer still being dialled, no new holder. Callers bound the
        whole wait.
        """
        looked_up = trio.Event()

        async def lookup() -> None:
            await self.discover(mid)
            looked_up.set()
            self.peers_changed()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookup)
            known: frozenset[str] = frozenset()
            while True:
                changed = self._peers_changed
                # Alone so far: wait longer for news. Nodes started together (a fleet
                # booting with `join --seed`) reach the bootstrap node, and hear of
                # each other through it, within a second; a node that starts alone
                # spends mirror connections on pieces another node may bring in too.
                settle = self._config.discover_settle if known else self._config.discover_alone
                with trio.move_on_after(settle) as quiet:
                    await changed.wait()
                # A delayed dial to a peer that meanwhile dialled us is not discovery in progress.
                busy = self._dialer.busy()
                holders = frozenset(self._dialer.holders(mid))
                # Nobody holds it (a new network): done once the DHT lookup came back empty.
                if quiet.cancelled_caught and not busy and holders == known and (holders or looked_up.is_set()):
                    break
                known = holders
            nursery.cancel_scope.cancel()

    async def run_discoverer(self) -> None:
        """While fetching, keep finding providers of each wanted manifest and open sessions.

        Strategy: nodes started together publish their provider records
        moments after each other, so the first seconds of a fetch look often
        (``discover_fast``) until some peer holding the manifest is in
        session; from then on peer exchange (``Peers``) introduces the rest
        and the DHT is asked every ``discover_interval``.
        """
        cfg = self._config
        while True:
            for mid in self._fetches.ids():
                await self.discover(mid)
            now = trio.current_time()
            # Fast rounds only while a young fetch knows no other holder: once one
            # session holds the manifest, peer exchange brings the rest (a DHT
            # lookup costs every node on the path a stream and a query).
            young = any(
                now - t < cfg.discover_fast_for and not self._dialer.holders(mid) for mid, t in self._fetches.attached_at.items()
            )
            interval = min(cfg.discover_interval, cfg.discover_fast) if young else cfg.discover_interval
            with trio.move_on_after(interval):
                await self._wanted_changed.wait()
            self._wanted_changed = trio.Event()

    async def discover_files(self, mid: bytes, delay: float = 2.0) -> None:
        """A while into a fetch: dial the DHT's providers of its files (identical files in other manifests).

        Later than the manifest lookup, and off the start's critical path: it
        is for pieces nobody fetching this manifest has.
        """
        await trio.sleep(delay)
        fetch = self._fetches.get(mid)
        # A fetch shared by several peers spreads the first copy among them, and
        # their sessions already show what else they hold: the lookups (a few
        # DHT round trips each, on every node) are for a node fetching nearly alone.
        if fetch is None or self._p2p is None or len(self._dialer.holders(mid)) >= 3:
            return
        for sha in fetch.file_sha256s()[:8]:
            if self._fetches.get(mid) is not fetch:
                return
            await self._dialer.dial_all(await self._p2p.find_file_providers(sha))

    # -- manifests by id (for name records) ----------------------------------------
    async def fetch_manifest(self, manifest_id: bytes) -> bytes:
        """The signed envelope of ``manifest_id`` from any peer that holds it (callers bound the wait)."""
        envelopes = self._held.envelopes
        asked: set[str] = set()
        self._awaited.add(manifest_id)
        while manifest_id not in envelopes:
            changed = self._peers_changed
            await self.discover(manifest_id)
            for p, s in list(self._dialer.sessions.items()):
                if s.bitfield(manifest_id) is not None and p not in asked:
                    asked.add(p)
                    s.post(GetManifest(manifest_id))
            if manifest_id not in envelopes:
                with trio.move_on_after(self._config.discover_interval):
                    await changed.wait()
        return envelopes[manifest_id]

    def on_manifest_data(self, s: Session, msg: ManifestData) -> None:
        """An envelope that :meth:`fetch_manifest` waits for (any other is dropped)."""
        envelopes = self._held.envelopes
        if not msg.envelope or msg.manifest_id in envelopes or msg.manifest_id not in self._awaited:
            return
        try:
            ok = decode_signed_manifest(msg.envelope).id == msg.manifest_id
        except RemoteProtocolError:
            ok = False
        if not ok:
            log.warning("peer %s sent a manifest that is not %s", s.peer_id, msg.manifest_id.hex()[:16])
            return
        # Only the id was checked here; signature and trust are the caller's check.
        envelopes[msg.manifest_id] = msg.envelope
        self._awaited.discard(msg.manifest_id)
        self.peers_changed()

    # -- announcements -----------------------------------------------------------
    def _needs_provide(self, mid: bytes, now: float) -> bool:
        # Announce when never announced, when the record is due for refresh, and
        # when the routing table has grown a lot since (we joined more of the
        # network, so the record belongs on other nodes too).
        last = self._provided.get(mid)
        if last is None:
            return True
        t, size = last
        return now - t >= self._config.reprovide_interval or self._p2p.dht_size() >= 2 * size + 1

    async def _provide_paced(self, provide: Callable[[bytes], Awaitable[bool]], key: bytes) -> bool:
        now = trio.current_time()
        self._provide_times = [t for t in self._provide_times if now - t < _PROVIDE_WINDOW]
        if len(self._provide_times) >= _PROVIDE_MAX:
            await trio.sleep_until(self._provide_times[0] + _PROVIDE_WINDOW)
        self._provide_times.append(trio.current_time())
        return await provide(key)

    async def run_provider(self) -> None:
        """Announce held manifests, and files held whole, in the DHT: never per piece."""
        while True:
            now = trio.current_time()
            for mid in self._held.ids():
                if mid not in self._held:
                    continue  # withdrawn while this round ran
                if self._needs_provide(mid, now):
                    size = self._p2p.dht_size()
                    sent = await self._provide_paced(self._p2p.provide_manifest, mid)
                    if mid not in self._held:  # withdrawn during the provide: take our own record back
                        self._p2p.unprovide_manifest(mid)
                        continue
                    if sent:
                        self._provided[mid] = (trio.current_time(), size)
                        self._emit(Announced("manifest", mid))
                        self._provided_files.difference_update(self._held.file_hashes(mid))
                for sha in self._held.complete_file_hashes(mid):
                    if sha not in self._provided_files and await self._provide_paced(self._p2p.provide_file, sha):
                        self._provided_files.add(sha)
                        self._emit(Announced("file", sha))
            with trio.move_on_after(5.0):
                await self._held.changed.wait()
            self._held.reset_changed()
