"""The one py-libp2p adapter: identity, Noise+yamux host, Kademlia DHT (node/_kadclient.py), control streams.

Everything else in the node talks to :class:`P2PNode` and never imports
``libp2p``. libp2p carries identity, discovery and the small control
protocol; bulk piece bytes travel over peerwire (plain TCP, node/_peerwire.py),
because a py-libp2p yamux stream moves about 150 MB/s and dies when its reader
stalls.

Pitfalls handled here (py-libp2p 0.8.1): only Noise is offered (the default
also accepts plaintext); one connection per peer (avoids a 250 ms delay per
dial); the DHT exists before the first connection; ADD_PROVIDER is
rate-limited by receivers (10 per 10 s), so we announce per manifest and per
file, never per piece; libp2p's loggers are silenced by the CLI; one dial
retry, not three (an unreachable address failed after 15 s); yamux window
credit in halves and read-ahead on TCP connections (node/_libp2p_io.py).

Circuit relay v2 and hole punching live in node/_relays.py (``Relays``);
:func:`open_p2p` builds them and ``P2PNode`` delegates: a node with
``RelayBudget`` (``join --relay``) relays and advertises itself in the DHT,
and a node whose listen addresses are all private reserves at up to
``MAX_RELAYS`` relays (its bootstrap peers first, then relays the DHT names).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.exceptions import BaseLibp2pError
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.records.validator import Validator
from libp2p.relay.circuit_v2 import CircuitV2Transport, DCUtRProtocol
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from autoglm.node._kadclient import (
    DHT_TIMEOUT,
    PEER_QUERY_TIMEOUT,
    KadClient,
    PeerAddr,
)
from autoglm.node._kadnames import NameRecords
from autoglm.node._libp2p_io import apply as _apply_io_fixes
from autoglm.node._logs import apply_libp2p_level
from autoglm.node._relays import (
    MAX_RELAYS,
    RELAY_PROVIDER_KEY,
    HopService,
    RelayBudget,
    Relays,
    is_relayed_conn,
)
from autoglm.node.errors import ConfigError, SourceError
from autoglm.protocol._control import CONTROL_PROTOCOL_ID
from autoglm.protocol._namerecord import (
    NAME_NAMESPACE,
    NameRecord,
    select_name_record,
    verify_name_record,
)

__all__ = ["DEFAULT_LISTEN", "ControlStream", "P2PNode", "PeerAddr", "RelayBudget", "load_identity_seed", "open_p2p"]

log = logging.getLogger(__name__)
apply_libp2p_level()  # importing libp2p reset its logger
_apply_io_fixes()  # window credit in halves, read-ahead per TCP connection (node/_libp2p_io.py)

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"
_IDENTITY_FILE = "p2p-identity.key"
_DHT_TIMEOUT = DHT_TIMEOUT  # a dial or a stream open
_PEER_QUERY_TIMEOUT = PEER_QUERY_TIMEOUT


_PROTECT_TAG = "autoglm-session"


def load_identity_seed(data_dir: Path) -> bytes:
    """The node's persistent Ed25519 seed (created 0600 on first use)."""
    path = data_dir / _IDENTITY_FILE
    try:
        seed = path.read_bytes()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        seed = os.urandom(32)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, seed)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    if len(seed) != 32:
        raise ConfigError(f"{path} is not a 32-byte identity seed; delete it to make a new identity")
    return seed


class _NameRecordValidator(Validator):
    """libp2p's validator hook, backed by the sans-IO checks in protocol/_namerecord."""

    def __init__(self) -> None:
        self.on_record: Callable[[NameRecord], None] | None = None  # every valid record seen (join --follow)

    def validate(self, key: str, value: bytes) -> None:
        rec = verify_name_record(key, value)
        if self.on_record is not None:
            self.on_record(rec)

    def select(self, key: str, values: list[bytes]) -> int:
        return select_name_record(key, values)


class _KadDHT(KadDHT):
    """py-libp2p's Kademlia server, with its routing-table refresh left to :class:`P2PNode`.

    Its own refresh runs when the service starts (before the bootstrap dial,
    so it finds nobody) and every 10 minutes: a self-lookup plus one lookup per
    non-empty bucket, each in rounds of up to 10 queries that wait for the
    slowest, up to 20 rounds. Measured with 16 hosts bootstrapping from one, it
    kept the hosts at 5-8 CPU-s per 20 s for the first minute (the bootstrap
    node resetting the streams beyond its 12 concurrent handlers). Our refresh
    walks with alpha 3 and a bounded budget instead.
    """

    async def refresh_routing_table(self) -> None:
        return None


class ControlStream:
    """A Noise-authenticated libp2p stream, with trio-like errors."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.peer_id: str = str(stream.muxed_conn.peer_id)

    @property
    def relayed(self) -> bool:
        """The stream runs over a circuit through a relay (both ends behind NAT, say)."""
        return is_relayed_conn(self._stream.muxed_conn)

    @property
    def remote_host(self) -> str | None:
        """The IP the connection came from (the swarm reaches the peer's bulk channel there).

        None over a relayed connection: the address there is the relay's, and
        the relay's own ports must never be taken for the peer's.
        """
        if self.relayed:
            return None
        try:
            addr = self._stream.get_remote_address()
        except (AttributeError, OSError):
            return None
        return None if not addr else str(addr[0])

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Bytes, or b"" at end of stream. BrokenResourceError if the peer reset it."""
        try:
            data: bytes = await self._stream.read(max_bytes)
        except StreamEOF:
            return b""
        except (StreamError, OSError) as exc:
            raise trio.BrokenResourceError(f"control stream broke: {exc!r}") from exc
        return data

    async def send_all(self, data: bytes) -> None:
        try:
            await self._stream.write(data)
        except (StreamError, OSError) as exc:
            raise trio.BrokenResourceError(f"control stream broke: {exc!r}") from exc

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            try:
                await self._stream.close()
            except (StreamError, OSError):
                pass


ControlHandler = Callable[[ControlStream], Awaitable[None]]


class P2PNode:
    """A running libp2p host with its DHT. Create with :func:`open_p2p`."""

    def __init__(self, host: Any, dht: KadDHT, names: _NameRecordValidator | None = None,
                 relays: Relays | None = None) -> None:
        self._host = host
        self._dht = dht
        self._names = names or _NameRecordValidator()
        #: Circuit relay v2 and hole punching (node/_relays.py); None on a bare host (no relaying at all).
        self.relay = relays
        self.on_lookup: Callable[[float], None] | None = None  # each provider lookup's seconds (metrics)
        self._bootstrap: tuple[str, ...] = ()
        self.kad = KadClient(host, dht, self.connect, on_lookup=self._lookup_seconds)
        self.name_records = NameRecords(host, dht, self.kad.closest_peers)

    # -- circuit relay and hole punching: node/_relays.py ---------------------------
    @property
    def relays(self) -> list[str]:
        """Relays that hold a reservation for us (we are reachable through them), in order of success."""
        return self.relay.reserved if self.relay is not None else []

    def relay_status(self) -> dict[str, object]:
        return self.relay.status() if self.relay is not None else {}

    async def reserve(self, relay_peer: str) -> bool:
        return self.relay is not None and await self.relay.reserve(relay_peer)

    async def connect_via_relay(self, peer_id: str) -> bool:
        return self.relay is not None and await self.relay.connect_via_relay(peer_id)

    async def upgrade_direct(self, peer_id: str) -> bool:
        return self.relay is not None and await self.relay.upgrade_direct(peer_id)

    def is_relayed(self, peer_id: str) -> bool:
        return self.relay is not None and self.relay.is_relayed(peer_id)

    async def find_relays(self, limit: int = MAX_RELAYS * 2) -> list[str]:
        """Relays the DHT names (providers of ``RELAY_PROVIDER_KEY``), dialled at once, 10 s at most; their peer ids.

        At most ``limit`` of them are dialled: any node can write such a record.
        """
        found: list[str] = []

        async def dial(peer: PeerAddr) -> None:
            try:
                found.append(await self.connect(peer))
            except (SourceError, ConfigError) as exc:
                log.info("relay %s unreachable: %s", peer.peer_id, exc)

        named = [p for p in await self._find(RELAY_PROVIDER_KEY) if p.addrs][:limit]
        with trio.move_on_after(_PEER_QUERY_TIMEOUT * 2):
            async with trio.open_nursery() as nursery:
                for peer in named:
                    nursery.start_soon(dial, peer)
        return found

    async def advertise_relay(self) -> bool:
        """Provide ``RELAY_PROVIDER_KEY``: peers behind NAT find this node as a relay (``join --relay``)."""
        return await self._provide(RELAY_PROVIDER_KEY)

    def on_name_record(self, callback: Callable[[NameRecord], None] | None) -> None:
        """Call ``callback`` (synchronously, cheaply) with every valid name record this node sees:
        its own puts and gets, and each peer's PUT_VALUE (a push) or GET_VALUE answer."""
        self._names.on_record = callback

    async def push_name_record(self, record: NameRecord, peers: Sequence[str]) -> int:
        """PUT_VALUE ``record`` straight to ``peers`` (session peers; join --follow). Returns how many took it.

        Receivers validate it like any DHT put (signature, key, no lower seq).
        """
        value = record.encode()
        ok = 0

        async def one(peer: str) -> None:
            nonlocal ok
            with trio.move_on_after(_PEER_QUERY_TIMEOUT):
                try:
                    if await self._dht.value_store._store_at_peer(ID.from_base58(peer), record.key.encode(), value):
                        ok += 1
                except (BaseLibp2pError, OSError, ValueError) as exc:
                    log.debug("name record push to %s failed: %r", peer, exc)

        async with trio.open_nursery() as nursery:
            for p in peers:
                if p != self.peer_id:
                    nursery.start_soon(one, p)
        return ok

    @property
    def peer_id(self) -> str:
        return str(self._host.get_id())

    def addrs(self) -> list[str]:
        """Bound listen addresses with ``/p2p/<id>``: what other nodes join with."""
        out = []
        for a in self._host.get_addrs():
            s = str(a)
            out.append(s if "/p2p/" in s else f"{s}/p2p/{self.peer_id}")
        return out

    def connected_peers(self) -> list[str]:
        return [str(p) for p in self._host.get_connected_peers()]

    def protect(self, peer_id: str, on: bool = True) -> None:
        """Keep libp2p from trimming this peer's connection while a session runs on it.

        With one connection allowed per peer, two nodes dialling each other at
        once (the DHT does, on every lookup) end up with two connections and
        each side trims one by its own rule, often not the same one: both
        close, and every stream on them resets. A protected peer's
        connections are never trimmed.
        """
        try:
            pid = ID.from_base58(peer_id)
            net = self._host.get_network()
            if on:
                net.protect(pid, _PROTECT_TAG)
            else:
                net.unprotect(pid, _PROTECT_TAG)
        except (BaseLibp2pError, ValueError, AttributeError, KeyError):
            pass

    def peer_addrs(self, peer_id: str, limit: int = 8) -> tuple[str, ...]:
        """The listen multiaddrs the peerstore holds for a peer (learned by identify or the DHT)."""
        try:
            addrs = self._host.get_peerstore().addrs(ID.from_base58(peer_id))
        except (BaseLibp2pError, ValueError, KeyError):
            return ()
        return tuple(str(a) for a in addrs[:limit])

    def routing_peers(self) -> list[PeerAddr]:
        """The peers in the DHT routing table, with the addresses it holds for them."""
        try:
            infos = self._dht.routing_table.get_peer_infos()
        except (BaseLibp2pError, AttributeError):
            return []
        return [PeerAddr(str(i.peer_id), tuple(str(a) for a in i.addrs[:8])) for i in infos]

    def dht_size(self) -> int:
        return int(self._dht.get_routing_table_size())

    async def connect(self, addr: str | PeerAddr) -> str:
        """Dial a multiaddr ending in /p2p/ID (or a PeerAddr); returns the peer id."""
        try:
            if isinstance(addr, PeerAddr):
                info = PeerInfo(ID.from_base58(addr.peer_id), [multiaddr.Multiaddr(a) for a in addr.addrs])
            else:
                info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except (ValueError, TypeError, BaseLibp2pError) as exc:
            raise ConfigError(f"not a peer multiaddr (/ip4/HOST/tcp/PORT/p2p/ID): {addr}") from exc
        try:
            with trio.fail_after(_DHT_TIMEOUT):
                await self._host.connect(info)
        except (trio.TooSlowError, OSError, BaseLibp2pError) as exc:
            log.debug("direct dial to %s failed (%r); trying relays %s", info.peer_id, exc, self.relays)
            if await self.connect_via_relay(str(info.peer_id)):
                return str(info.peer_id)
            raise SourceError(f"cannot connect to {addr}: {exc}") from exc
        # py-libp2p can return from a failed dial without raising.
        if info.peer_id not in self._host.get_connected_peers() and not await self.connect_via_relay(str(info.peer_id)):
            raise SourceError(f"cannot connect to {addr}")
        return str(info.peer_id)


    # -- the DHT client: node/_kadclient.py (KadClient) ------------------------------
    def _lookup_seconds(self, seconds: float) -> None:
        if self.on_lookup is not None:
            self.on_lookup(seconds)

    async def refresh_routing(self) -> None:
        """Keep the routing table filled (runs until cancelled); see :meth:`KadClient.refresh_routing`."""
        await self.kad.refresh_routing(self._bootstrap)

    async def add_bootstrap_peer(self, addr: str) -> str:
        return await self.kad.add_bootstrap_peer(addr)

    async def provide_manifest(self, manifest_id: bytes) -> bool:
        return await self.kad.provide_manifest(manifest_id)

    def unprovide_manifest(self, manifest_id: bytes) -> None:
        self.kad.unprovide_manifest(manifest_id)

    async def provide_file(self, sha256: bytes) -> bool:
        return await self.kad.provide_file(sha256)

    async def find_manifest_providers(self, manifest_id: bytes) -> list[PeerAddr]:
        return await self.kad.find_manifest_providers(manifest_id)

    async def _provide(self, key: str) -> bool:
        return await self.kad.provide(key)

    async def _find(self, key: str) -> list[PeerAddr]:
        return await self.kad.find_providers(key)

    async def find_file_providers(self, sha256: bytes) -> list[PeerAddr]:
        return await self.kad.find_file_providers(sha256)

    async def put_name_record(self, record: NameRecord) -> None:
        await self.name_records.put(record)

    async def get_name_record(self, publisher_key_id: str, name: str) -> NameRecord | None:
        return await self.name_records.get(publisher_key_id, name)

    def set_control_handler(self, handler: ControlHandler) -> None:
        self.set_stream_handler(CONTROL_PROTOCOL_ID, handler)

    def set_stream_handler(self, protocol_id: str, handler: ControlHandler) -> None:
        """Serve another of the node's own protocols (``/autoglm/reverse/1``, node/swarm/reverse.py)."""

        async def on_stream(stream: Any) -> None:
            await handler(ControlStream(stream))

        self._host.set_stream_handler(protocol_id, on_stream)

    async def open_stream(self, peer_id: str, protocol_id: str) -> ControlStream:
        """A new stream of ``protocol_id`` on the connection to a peer (opened if needed)."""
        try:
            with trio.fail_after(_DHT_TIMEOUT):
                stream = await self._host.new_stream(ID.from_base58(peer_id), [protocol_id])
        except (trio.TooSlowError, OSError, BaseLibp2pError, ValueError) as exc:
            raise SourceError(f"cannot open {protocol_id} to {peer_id}: {exc}") from exc
        return ControlStream(stream)

    async def open_control(self, peer: str | PeerAddr) -> ControlStream:
        """Open /autoglm/swarm/1 to a peer (dialling its addrs first if given)."""
        if isinstance(peer, PeerAddr):
            if peer.addrs:
                await self.connect(peer)
            peer = peer.peer_id
        try:
            with trio.fail_after(_DHT_TIMEOUT):
                stream = await self._host.new_stream(ID.from_base58(peer), [CONTROL_PROTOCOL_ID])
        except (trio.TooSlowError, OSError, BaseLibp2pError) as exc:
            # new_stream dialled the addresses the peerstore holds; a peer behind
            # another NAT is reached through a relay, if one of ours knows it.
            if not await self.connect_via_relay(peer):
                raise SourceError(f"cannot open a control stream to {peer}: {exc}") from exc
            try:
                with trio.fail_after(_DHT_TIMEOUT):
                    stream = await self._host.new_stream(ID.from_base58(peer), [CONTROL_PROTOCOL_ID])
            except (trio.TooSlowError, OSError, BaseLibp2pError) as exc2:
                raise SourceError(f"cannot open a control stream to {peer} through a relay: {exc2}") from exc2
        return ControlStream(stream)


def _all_private(listen: Sequence[str]) -> bool:
    """No listen address is public or loopback: peers elsewhere may not reach us (behind NAT)."""
    hosts = []
    for a in listen:
        parts = a.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            hosts.append(parts[2])
    ips = []
    for h in hosts:
        try:
            ips.append(ipaddress.ip_address(h))
        except ValueError:
            continue
    return bool(ips) and not any(ip.is_global or ip.is_loopback or ip.is_unspecified for ip in ips)


class _NoAutoConnect(AutoConnector):
    """py-libp2p's auto-connector, switched off.

    It dials every peer in the peerstore that it holds no connection to (16
    to 32 at a time, every 10 s and after every disconnect) until it has
    150 connections, and the peerstore fills with every peer any DHT answer
    named: a fleet of up to ~150 nodes ends up fully meshed (a Noise and
    yamux handshake and an identify each, in Python), and dials crossing
    each other leave dead connections behind. Our nodes dial whom they
    need: DHT walks, swarm sessions (docs/benchmarks.md, "The DHT at scale").
    """

    async def maybe_connect(self) -> None:
        return None


def _make_host(seed: bytes) -> Any:
    kp = create_new_key_pair(seed)
    noise = NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(
        key_pair=kp,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_preference="YAMUX",
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        enable_mDNS=False,
        enable_upnp=False,
    )
    # py-libp2p's default (3 retries) turns an unreachable address (a peer's
    # private address behind another NAT: "network unreachable" in under a
    # millisecond) into a 15 s failure, measured; one retry fails in 0.1 s,
    # and the relayed dial that follows starts that much sooner.
    network: Any = host.get_network()
    network.retry_config = RetryConfig(max_retries=1)
    network.auto_connector = _NoAutoConnect(network)
    return host


async def _first_reservations(node: P2PNode, relays: Relays, bootstrap: Sequence[str]) -> None:
    """A NATed node's first reservations, before ``open_p2p`` yields: the bootstrap peers, then the DHT's relays.

    Without a reservation no other NATed node can reach us, so a node whose
    bootstrap peers relay nothing spends up to another 20 s finding relays.
    """
    with trio.move_on_after(_PEER_QUERY_TIMEOUT):
        await relays.reserve_round(bootstrap)
    if len(relays.reserved) < MAX_RELAYS:
        with trio.move_on_after(_DHT_TIMEOUT):
            await relays.reserve_round(await node.find_relays(), renew=False)


@asynccontextmanager
async def open_p2p(
    data_dir: Path,
    listen: Sequence[str] = (DEFAULT_LISTEN,),
    bootstrap: Sequence[str] = (),
    relay: RelayBudget | None = None,
) -> AsyncIterator[P2PNode]:
    """Start the host and DHT, dial the bootstrap peers, and yield the node.

    Every node accepts connections through a relay and can dial through one
    (circuit relay v2, py-libp2p's); with ``relay`` it also relays for others
    within that budget, and advertises itself as one in the DHT. A node whose
    listen addresses are all private holds reservations at up to
    ``MAX_RELAYS`` relays: its bootstrap peers that are relays, then relays
    the DHT names (node/_relays.py).
    """
    try:
        maddrs = [multiaddr.Multiaddr(a) for a in listen]
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"bad --listen multiaddr: {exc}") from exc
    host = _make_host(load_identity_seed(data_dir))
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(host.run(maddrs))
        # The DHT must exist before the first connection, or it misses the peer.
        dht = _KadDHT(host, DHTMode.SERVER)
        names = _NameRecordValidator()
        dht.validator.add_validator(NAME_NAMESPACE, names)  # type: ignore[union-attr]
        await stack.enter_async_context(background_trio_service(dht))
        budget = relay or RelayBudget()
        hop = HopService(host, budget, allow_hop=relay is not None)
        await stack.enter_async_context(background_trio_service(hop))
        circuits = CircuitV2Transport(host, hop, RelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT, limits=budget.limits()))
        # Hole punching: over a relayed connection, both ends dial each other's
        # predicted outside address from their listen port at once (docs/nat.md).
        dcutr = DCUtRProtocol(host)
        await stack.enter_async_context(background_trio_service(dcutr))
        relays = Relays(host, circuits, hop, dcutr)
        node = P2PNode(host, dht, names, relays)
        node._bootstrap = tuple(bootstrap)
        booted: list[str] = []
        for addr in bootstrap:
            try:
                booted.append(await node.add_bootstrap_peer(addr))
            except SourceError as exc:
                log.warning("bootstrap peer unreachable: %s", exc)
        nursery = await stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(node.refresh_routing)
        if relay is not None:
            # Advertised before we yield: a relay that says "ready" can be found.
            with trio.move_on_after(_DHT_TIMEOUT):
                await node.advertise_relay()
            nursery.start_soon(relays.advertise, node.advertise_relay)
        if booted and _all_private(listen):
            await _first_reservations(node, relays, booted)
            nursery.start_soon(relays.keep_reservations, booted, node.find_relays)
        try:
            yield node
        finally:
            nursery.cancel_scope.cancel()
