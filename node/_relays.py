"""Circuit relay v2 and hole punching for :class:`~autoglm.node._p2p.P2PNode` (py-libp2p's ``circuit_v2``).

Part of the libp2p adapter: only node/_p2p.py builds these objects, and the
rest of the node reaches them through ``P2PNode``.

Every node runs the STOP side (accepts connections through a relay) and
dials through the relays that hold a reservation for it when a direct dial
fails; a node with :class:`RelayBudget` (``join --relay``) also relays,
within that budget, and advertises itself as a relay with a DHT provider
record under :data:`RELAY_PROVIDER_KEY`. A node whose listen addresses are
all private (behind NAT) reserves at its bootstrap peers and at relays it
finds under that key, up to :data:`MAX_RELAYS` in all.

Over a relayed connection, :meth:`Relays.upgrade_direct` tries a hole punch
(DCUtR): both ends dial each other's observed outside address from their
listen port at once (docs/nat.md).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2 import (
    CircuitV2Protocol,
    CircuitV2Transport,
    DCUtRProtocol,
    RelayLimits,
)
from libp2p.relay.circuit_v2.dcutr import MAX_HOLE_PUNCH_ATTEMPTS
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID

from autoglm.node._ratelimit import RateLimiter

__all__ = ["MAX_RELAYS", "RELAY_PROVIDER_KEY", "HopService", "RelayBudget", "Relays", "is_relayed_conn"]

log = logging.getLogger("autoglm.node._p2p")

#: Relays a node behind NAT holds a reservation at (and dials others through): K.
MAX_RELAYS = 3
#: The DHT provider key every ``join --relay`` node provides (hashed like the manifest and file keys).
RELAY_PROVIDER_KEY = hashlib.sha256(b"autoglm/provide/relay\x00v1").hexdigest()
_RESERVE_EVERY = 300.0  # a reservation is renewed, and relays looked for again, this often (the relay grants 1 h)
_RESERVE_SOON = 30.0  # ... or this often while no relay holds one
_ADVERTISE_AFTER = 30.0  # a relay's provider record goes out before open_p2p yields, again once the fleet has joined,
_ADVERTISE_EVERY = 1800.0  # then every 30 minutes (records live 48 h at the peers that store them)
_RESERVE_TIMEOUT = 10.0
_CIRCUIT_TIMEOUT = 10.0
#: How long one call waits for hole punching to give a direct connection. It covers one
#: py-libp2p attempt (3 rounds of simultaneous dials, 5 s each, 2 s apart) with room for a
#: loaded machine; an attempt cut short is taken up again by the next call.
_PUNCH_BUDGET = 30.0
#: After a punch failed for a peer, streams to it go relayed at once for this long.
_PUNCH_RETRY = 300.0
_MAX_TRACKED = 4096  # peers remembered as relayed / hole-punched (status counts)


@dataclass(frozen=True, slots=True)
class RelayBudget:
    """What a relay (``join --relay``) grants; every number is per relay node unless it says per peer.

    Circuits carry libp2p connections between two peers that cannot dial each
    other (both behind NAT): the control session and the relayed peerwire
    streams (node/swarm/relay.py). The relay never stores or fetches pieces:
    a circuit moves bytes between two peers, so relaying costs the origin
    nothing.
    """

    reservations: int = 32  # peers holding a reservation at once
    circuits_per_peer: int = 4  # circuits to one reserved peer at once
    bytes_per_circuit: int = 256 * 1024 * 1024  # both directions together; the circuit is reset past it
    seconds_per_circuit: int = 600  # the circuit is reset past it
    reservation_ttl: int = 3600
    bytes_per_second: float | None = 16 * 1024 * 1024  # all circuits together (a py-libp2p relay moves ~3 MB/s anyway)

    def limits(self) -> RelayLimits:
        return RelayLimits(duration=self.seconds_per_circuit, data=self.bytes_per_circuit,
                           max_circuit_conns=self.circuits_per_peer, max_reservations=self.reservations,
                           reservation_ttl=self.reservation_ttl)


class HopService(CircuitV2Protocol):
    """py-libp2p's relay, with a reservation always for the peer on the connection.

    py-libp2p reserves for whatever peer id the RESERVE message names, so one
    connection could take every slot of the budget under made-up ids.
    """

    def __init__(self, host: Any, budget: RelayBudget, allow_hop: bool) -> None:
        super().__init__(host, budget.limits(), allow_hop=allow_hop)
        self.rate = RateLimiter(budget.bytes_per_second)
        self.relayed_bytes = 0  # bytes this node copied for circuits, both directions

    async def _handle_reserve(self, stream: Any, msg: Any) -> None:
        msg.peer.id = stream.muxed_conn.peer_id.to_bytes()
        await super()._handle_reserve(stream, msg)

    async def _relay_data(self, src_stream: Any, *args: Any, **kwargs: Any) -> None:
        # Every byte a circuit carries is read here: one token bucket for all circuits.
        paced: Any = _Paced(src_stream, self)
        await super()._relay_data(paced, *args, **kwargs)


class _Paced:
    """A relayed stream whose reads take their bytes from the relay's token bucket."""

    def __init__(self, stream: Any, relay: HopService) -> None:
        self._stream = stream
        self._relay = relay

    async def read(self, n: int | None = None) -> bytes:
        data: bytes = await self._stream.read(n)
        if data:
            self._relay.relayed_bytes += len(data)
            await self._relay.rate.acquire(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def is_relayed_conn(muxed_conn: Any) -> bool:
    """Whether a libp2p connection runs through a relay (its transport address names /p2p-circuit)."""
    try:
        addrs = muxed_conn.get_transport_addresses() or []
    except (AttributeError, BaseLibp2pError, OSError):
        return False
    return any("/p2p-circuit" in str(a) for a in addrs)


class Relays:
    """This node's side of circuit relay v2: reservations, relayed dials, hole punches, and (a relay) the hop service.

    ``reserved`` lists the relays that hold a reservation for us (we are
    reachable through them), in order of success.
    """

    def __init__(self, host: Any, circuits: CircuitV2Transport, hop: HopService, dcutr: DCUtRProtocol) -> None:
        self._host = host
        self._circuits = circuits
        self._hop = hop
        self._dcutr = dcutr
        self.reserved: list[str] = []
        self.relayed_dials = 0  # libp2p connections this node opened through a relay
        self._no_punch: dict[str, float] = {}  # peer -> until when streams go relayed without a punch
        # Peers first reached only through a relay, and those of them later reached directly (a hole
        # punch, whichever end started it): py-libp2p's own set forgets a peer on disconnect, and
        # misses a punch its verification step judged too early.
        self._relayed_peers: dict[str, None] = {}
        self._punched: dict[str, None] = {}

    @property
    def is_relay(self) -> bool:
        """This node relays for others (``join --relay``)."""
        return bool(self._hop.allow_hop)

    def status(self) -> dict[str, object]:
        """Reservations held at relays, connections dialled through them, and (a relay) bytes relayed."""
        out: dict[str, object] = {"reserved_at": list(self.reserved), "relayed_dials": self.relayed_dials}
        if self.is_relay:
            out["relayed_bytes"] = self._hop.relayed_bytes
            out["circuits_now"] = len(self._hop._active_relays)
        # py-libp2p keeps these per peer until it disconnects: peers now, not totals.
        out["hole_punch_tried"] = len(self._dcutr._hole_punch_attempts)
        for p in list(self._relayed_peers):
            self._note_direct(p)
        out["hole_punched"] = len(self._punched)  # peers reached directly after a relay, since start
        out["hole_punched_now"] = len(self._dcutr._direct_connections)
        return out

    def _note_relayed(self, peer_id: str) -> None:
        if peer_id not in self._relayed_peers and len(self._relayed_peers) < _MAX_TRACKED:
            self._relayed_peers[peer_id] = None

    def _note_direct(self, peer_id: str) -> None:
        """``peer_id`` was relayed and now has a direct connection: count the punch (once per peer)."""
        if peer_id in self._relayed_peers and peer_id not in self._punched and self.has_direct(peer_id):
            if len(self._punched) < _MAX_TRACKED:
                self._punched[peer_id] = None

    def has_direct(self, peer_id: str) -> bool:
        """Some libp2p connection we hold to ``peer_id`` does not run through a relay."""
        try:
            conns = self._host.get_network().get_connections(ID.from_base58(peer_id))
        except (AttributeError, BaseLibp2pError, ValueError, KeyError):
            return False
        return any(not is_relayed_conn(getattr(c, "muxed_conn", c)) for c in conns)

    async def reserve(self, relay_peer: str) -> bool:
        """Ask a connected relay to hold a reservation for us, so peers can reach us through it."""
        try:
            rid = ID.from_base58(relay_peer)
            with trio.fail_after(_RESERVE_TIMEOUT):
                stream = await self._host.new_stream(rid, [HOP_PROTOCOL_ID])
                try:
                    ok = bool(await self._circuits._make_reservation(stream, rid))
                finally:
                    with trio.move_on_after(2):
                        await stream.close()
        except (trio.TooSlowError, OSError, BaseLibp2pError, ValueError) as exc:
            log.info("no reservation at %s: %r", relay_peer, exc)
            return False
        if ok and relay_peer not in self.reserved:
            log.info("reserved a relay slot at %s", relay_peer)
            self.reserved.append(relay_peer)
        if not ok and relay_peer in self.reserved:
            self.reserved.remove(relay_peer)
        return ok

    async def reserve_round(self, candidates: Sequence[str], renew: bool = True) -> None:
        """Renew the reservations held (``renew``), then take new ones from ``candidates``, in order, up to :data:`MAX_RELAYS`.

        At most ``2 * MAX_RELAYS`` new candidates are asked a round. One that
        is no relay refuses the hop protocol at once; it is asked again at the
        next round.
        """
        held = list(self.reserved)
        if renew:
            for peer in held:
                await self.reserve(peer)
        for peer in [c for c in dict.fromkeys(candidates) if c not in held][: MAX_RELAYS * 2]:
            if len(self.reserved) >= MAX_RELAYS:
                return
            await self.reserve(peer)

    async def keep_reservations(self, bootstrap: Sequence[str], discover: Callable[[], Awaitable[list[str]]]) -> None:
        """Hold reservations at up to :data:`MAX_RELAYS` relays: the bootstrap peers first, then relays the DHT names.

        ``discover`` returns relays found under :data:`RELAY_PROVIDER_KEY`,
        already connected. ``open_p2p`` awaits the first round before it
        yields (so a fetch that starts at once can dial through a relay); this
        loop renews the reservations every 5 minutes (every 30 s while none is
        held) and looks for relays again while fewer than :data:`MAX_RELAYS`
        hold one. Runs until cancelled.
        """
        while True:
            await trio.sleep(_RESERVE_EVERY if self.reserved else _RESERVE_SOON)
            await self.reserve_round(bootstrap)
            if len(self.reserved) < MAX_RELAYS:
                await self.reserve_round(await discover(), renew=False)

    async def advertise(self, provide: Callable[[], Awaitable[bool]]) -> None:
        """Republish a relay's provider record under :data:`RELAY_PROVIDER_KEY`: 30 s after start, then every 30 minutes.

        The first record goes out before ``open_p2p`` yields.
        """
        await trio.sleep(_ADVERTISE_AFTER)
        await provide()
        while True:
            await trio.sleep(_ADVERTISE_EVERY)
            await provide()

    async def connect_via_relay(self, peer_id: str) -> bool:
        """Open a libp2p connection to ``peer_id`` through a relay that holds a reservation for us; True if one opened.

        In a fleet behind NAT, peers reserve at the same public nodes (their
        bootstrap peers, and the relays the DHT names), so the peer we cannot
        dial holds one there too. Streams to the peer then use this connection
        (the control session, relayed peerwire: node/swarm/relay.py).
        """
        try:
            dest = ID.from_base58(peer_id)
        except (ValueError, BaseLibp2pError):
            return False
        if dest == self._host.get_id():
            return False
        if dest in self._host.get_connected_peers():
            return True  # a connection (relayed, say) exists: streams use it
        for relay in list(self.reserved):
            if relay == peer_id:
                continue
            try:
                rid = ID.from_base58(relay)
                with trio.fail_after(_CIRCUIT_TIMEOUT):
                    raw = await self._circuits.dial_peer_info(
                        PeerInfo(dest, []), relay_info=PeerInfo(rid, self._host.get_peerstore().addrs(rid)))
                    await self._host.upgrade_outbound_connection(raw, dest)
            except (trio.TooSlowError, OSError, BaseLibp2pError, ValueError, ConnectionError) as exc:
                log.info("no circuit to %s through %s: %r", peer_id, relay, exc)
                continue
            if dest in self._host.get_connected_peers():
                self.relayed_dials += 1
                self._note_relayed(peer_id)
                log.info("connected to %s through relay %s", peer_id, relay)
                return True
        return False

    def is_relayed(self, peer_id: str) -> bool:
        """Every libp2p connection we hold to ``peer_id`` runs through a relay."""
        try:
            conns = self._host.get_network().get_connections(ID.from_base58(peer_id))
        except (AttributeError, BaseLibp2pError, ValueError, KeyError):
            return False
        return bool(conns) and all(is_relayed_conn(getattr(c, "muxed_conn", c)) for c in conns)

    async def upgrade_direct(self, peer_id: str) -> bool:
        """Over a relayed connection, try a hole punch (DCUtR) to a direct one; True if one now exists.

        Strategy: py-libp2p's attempt dials in up to 3 rounds (a round whose
        SYNs crossed at the wrong moment must not doom it), and both ends also
        start attempts of their own for relayed peers (up to 3 per peer); we
        wait for them up to :data:`_PUNCH_BUDGET`, taking another attempt while
        time remains. Waiting pays: a hole-punched connection moved 64 MiB 3.5×
        faster than the relay (docs/benchmarks.md). After a failed punch the
        peer's streams go relayed at once for :data:`_PUNCH_RETRY`. Streams
        opened afterwards go over the direct connection (py-libp2p prefers
        it), and py-libp2p closes the relayed one after a grace period.
        """
        if not self.is_relayed(peer_id):
            self._note_direct(peer_id)  # the peer's own attempt may have punched first
            return False
        self._note_relayed(peer_id)
        now = trio.current_time()
        if self._no_punch.get(peer_id, 0.0) > now:
            return False
        pid = ID.from_base58(peer_id)
        with trio.move_on_after(_PUNCH_BUDGET):
            while self.is_relayed(peer_id):
                try:
                    if await self._dcutr.initiate_hole_punch(pid):
                        self._note_direct(peer_id)
                        return True
                except (BaseLibp2pError, OSError, ValueError) as exc:
                    log.info("hole punch to %s failed: %r", peer_id, exc)
                # Attempts used up (ours and the peer's), or one in flight: wait for it, or give up.
                if self._dcutr._hole_punch_attempts.get(pid, 0) >= MAX_HOLE_PUNCH_ATTEMPTS and pid not in self._dcutr._in_progress:
                    break
                await trio.sleep(1.0)
        if not self.is_relayed(peer_id):
            self._note_direct(peer_id)
            return True
        if len(self._no_punch) > 4096:
            self._no_punch = {p: t for p, t in self._no_punch.items() if t > now}
        self._no_punch[peer_id] = trio.current_time() + _PUNCH_RETRY
        log.info("no hole punch to %s; its streams go through the relay", peer_id)
        return False
