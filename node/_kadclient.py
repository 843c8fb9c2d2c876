"""Our Kademlia client: walks, routing-table refresh and provider records (name records: node/_kadnames.py).

:class:`KadClient` runs over a libp2p host and py-libp2p's ``KadDHT`` (which
keeps serving other nodes' requests, its routing table and its record
stores); every lookup this node makes is ours. The walk itself is the
sans-IO state machine in protocol/_kadlookup.py, pumped by node/_kadwalk.py;
this module speaks the wire (one kademlia_pb2 message per stream) and owns
the provider records. ``P2PNode`` (node/_p2p.py) builds it and delegates its DHT
methods to it, so the rest of the node still talks to ``P2PNode`` alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from libp2p.kad_dht.kad_dht import KadDHT, _encode_key
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from autoglm.node._kadwalk import run_lookup
from autoglm.node._kadwire import MAX_ADDRS, MAX_PEERS_PER_ANSWER, KadWire, PeerAddr
from autoglm.node.errors import SourceError
from autoglm.protocol._kadlookup import Lookup, LookupParams, key_point

__all__ = ["DHT_TIMEOUT", "PEER_QUERY_TIMEOUT", "KadClient", "PeerAddr", "file_provider_key", "manifest_provider_key"]

log = logging.getLogger(__name__)

DHT_TIMEOUT = 20.0  # one lookup, put or resolve as the caller sees it
PEER_QUERY_TIMEOUT = 5.0  # one peer's answer to a query
# Our own iterative walks (protocol/_kadlookup.py): alpha 3 in flight, k 20,
# 5 s per peer, 15 s per lookup. The routing table is refreshed after
# bootstrap and again, backing off (1, 2, 4 ... 60 s), until two refreshes in
# a row have added nobody (a fleet booting together keeps joining for a
# minute or more on a loaded machine), then every 10 minutes.
_LOOKUP = LookupParams(query_timeout=PEER_QUERY_TIMEOUT)
_REFRESH_INTERVAL = 600.0
_REFRESH_JITTER = 2.0
_REFRESH_BACKOFF = (1.0, 60.0)  # first and longest wait between start-up refreshes
_REFRESH_STABLE = 2  # start-up refreshes in a row that added nobody before the slow pace
_FIND_NODE = Message.MessageType.FIND_NODE
_GET_PROVIDERS = Message.MessageType.GET_PROVIDERS
_ADD_PROVIDER = Message.MessageType.ADD_PROVIDER


def manifest_provider_key(manifest_id: bytes) -> str:
    # Hashed with a tag so provider keys for manifests and for files never collide.
    return hashlib.sha256(b"autoglm/provide/manifest\x00" + manifest_id).hexdigest()


def file_provider_key(sha256: bytes) -> str:
    return hashlib.sha256(b"autoglm/provide/file\x00" + sha256).hexdigest()


class KadClient:
    """This node's side of the DHT as a client: every walk, provide and find.

    ``connect`` dials a ``/p2p/`` multiaddr and returns the peer id (the
    façade's, which falls back to relays); ``on_lookup`` gets each provider
    lookup's seconds (metrics).
    """

    def __init__(self, host: Any, dht: KadDHT, connect: Callable[[str], Awaitable[str]],
                 on_lookup: Callable[[float], None] | None = None) -> None:
        self._host = host
        self._dht = dht
        self._connect = connect
        self.on_lookup = on_lookup
        self._wire = KadWire(host, dht)

    @property
    def _peer_id(self) -> str:
        return str(self._host.get_id())

    def size(self) -> int:
        """Peers in the routing table."""
        return int(self._dht.get_routing_table_size())

    # -- walks (protocol/_kadlookup.py decides, node/_kadwalk.py pumps) ------------
    def _seeds(self, key: bytes) -> list[tuple[str, bytes]]:
        peers = {*self._dht.routing_table.find_local_closest_peers(key, _LOOKUP.k), *self._host.get_connected_peers()}
        return [(str(p), key_point(p.to_bytes())) for p in peers]

    async def _walk(self, key: bytes, kind: int = _FIND_NODE,
                    on_reply: Callable[[Lookup, str, Any], None] | None = None, budget: float | None = None,
                    need: int | None = None) -> Lookup:
        """An iterative lookup of ``key`` (FIND_NODE, or GET_PROVIDERS with ``on_reply``), bounded by its budget."""
        params = _LOOKUP if budget is None else dataclasses.replace(_LOOKUP, budget=budget)
        lookup = Lookup(key_point(key), self._seeds(key), trio.current_time(), params, exclude=[self._peer_id], need=need)

        async def ask(peer: str) -> list[tuple[str, bytes]]:
            reply = await self._wire.rpc(peer, kind, key)
            if on_reply is not None:
                on_reply(lookup, peer, reply)
            return [(p.peer_id, key_point(ID.from_base58(p.peer_id).to_bytes())) for p in self._wire.learn(reply.closerPeers)]

        await run_lookup(lookup, ask)
        return lookup

    async def closest_peers(self, key: bytes, budget: float) -> list[str]:
        """The closest peers to ``key`` a FIND_NODE walk reaches within ``budget`` seconds."""
        return list((await self._walk(key, budget=budget)).closest())

    # -- the routing table ---------------------------------------------------------
    async def refresh_routing(self, bootstrap: Iterable[str] = ()) -> None:
        """Keep the routing table filled: a self-lookup and a random-key lookup, now and then.

        The self-lookup makes the peers closest to us learn of us (each adds a
        peer that sends it a DHT request) and us of them; the random key fills a
        far bucket. Without it a node knows only its bootstrap peers and whoever
        happened to query it. ``bootstrap`` (multiaddrs) is dialled again when
        the node finds itself alone.
        """
        async with trio.open_nursery() as background:
            self._wire.background = background
            try:
                await self._refresh_forever(tuple(bootstrap))
            finally:
                self._wire.background = None

    async def _refresh_forever(self, bootstrap: tuple[str, ...]) -> None:
        # A fleet booting together sends every first lookup to the same bootstrap
        # node, which resets DHT streams beyond 12 at once: spread the starts.
        await trio.sleep(random.random() * _REFRESH_JITTER)
        # Then refresh until the table stops growing. A fixed schedule (a retry
        # while under 3 peers for 30 s, then one at 30 s) left 64 hosts on a
        # loaded machine at 1-7 peers each: their first walks timed out at the
        # busy bootstrap node, the table passed 3, and the next try was 10
        # minutes away.
        wait, stable = _REFRESH_BACKOFF[0], 0
        while stable < _REFRESH_STABLE:
            before = self.size()
            await self._refresh_once(bootstrap)
            grew = self.size() > before
            stable = 0 if grew or self.size() < _LOOKUP.beta else stable + 1
            await trio.sleep(wait * (0.5 + random.random()))
            wait = min(wait * 2, _REFRESH_BACKOFF[1])
        while True:
            await trio.sleep(_REFRESH_INTERVAL)
            await self._refresh_once(bootstrap)

    async def add_bootstrap_peer(self, addr: str) -> str:
        """Dial a bootstrap peer and put it in the routing table at once.

        Our answers to DHT requests name routing-table peers only: a node that
        has not finished its first refresh would otherwise name nobody, and a
        walk through it would end there.
        """
        peer = await self._connect(addr)
        pid = ID.from_base58(peer)
        addrs = self._host.get_peerstore().addrs(pid)
        if addrs:
            await self._dht.routing_table.add_peer(PeerInfo(pid, addrs))
        return peer

    async def _refresh_once(self, bootstrap: tuple[str, ...]) -> None:
        if not self.size() and not self._host.get_connected_peers():
            # Alone again (the bootstrap connection was trimmed or dropped): dial the bootstrap peers.
            for addr in bootstrap:
                try:
                    await self.add_bootstrap_peer(addr)
                except SourceError as exc:
                    log.info("bootstrap peer unreachable: %s", exc)
        await self._walk(self._host.get_id().to_bytes())
        await self._walk(os.urandom(32))

    # -- provider records ----------------------------------------------------------
    async def provide(self, key: str) -> bool:
        """Our provider record for ``key`` (a string key, as the ``*_provider_key`` functions make),
        stored locally and on the k closest peers a full walk finds.

        The walk is a full one (it ends when the k closest live peers it knows
        have answered, or all it can reach): a walk that stopped at the beta
        closest left records on whichever peers a young routing table led it
        to, and a later GET_PROVIDERS walk could miss them. On a loaded
        machine a full walk can take its whole 15 s budget, after which
        ADD_PROVIDERs to peers it has not spoken to for a while may not get a
        stream within their 5 s (a 12-host test with four copies in parallel
        placed no record that way). So each peer that answers while it is
        among the k closest the walk knows gets the record at once, on the
        connection that just answered; when the walk ends, the k closest it
        knows that have not got it yet (all of them if the walk was cut by
        its budget, those not known to have failed) get it too. A few peers
        that later fall out of the k closest hold a spare record.
        """
        kb = _encode_key(key)  # the key bytes earlier versions used
        self._dht.provider_store.add_provider(kb, PeerInfo(self._host.get_id(), self._host.get_addrs()))
        sent = 0
        placed: set[str] = set()

        message = self._wire.message(_ADD_PROVIDER, kb)
        me = message.providerPeers.add()
        me.id = self._host.get_id().to_bytes()
        me.addrs.extend(a.to_bytes() for a in self._host.get_addrs())
        me.signedRecord = message.senderRecord

        async def one(peer: str) -> None:
            # Fire and forget, as py-libp2p and Kubo do: no echo is read.
            nonlocal sent
            with trio.move_on_after(PEER_QUERY_TIMEOUT):
                try:
                    await self._wire.send(ID.from_base58(peer), message, None)
                    sent += 1
                except SourceError as exc:
                    log.debug("ADD_PROVIDER to %s failed: %r", peer, exc)

        async with trio.open_nursery() as nursery:

            def place(peer: str) -> None:
                if peer not in placed:
                    placed.add(peer)
                    nursery.start_soon(one, peer)

            def on_reply(lookup: Lookup, peer: str, reply: Any) -> None:
                if peer in lookup.known_closest():
                    place(peer)

            # The walk's budget (15 s) and the sends' 5 s keep a provide within 20 s.
            lookup = await self._walk(kb, on_reply=on_reply, need=_LOOKUP.k)
            for peer in lookup.known_closest():
                place(peer)
        log.debug("provide: walk of %d queries, %d answers%s; record sent to %d of %d peers",
                  lookup.queries, lookup.answers, " (cut by its budget)" if lookup.timed_out else "", sent, len(placed))
        return sent > 0

    async def provide_manifest(self, manifest_id: bytes) -> bool:
        return await self.provide(manifest_provider_key(manifest_id))

    def unprovide_manifest(self, manifest_id: bytes) -> None:
        """Stop providing a manifest: no more republishing, and this node's own record is dropped locally.

        Kademlia has no withdrawal: records already stored at other nodes expire (48 h).
        """
        store = self._dht.provider_store
        key = _encode_key(manifest_provider_key(manifest_id))
        store.providing_keys.discard(key)
        mine = store.providers.get(key)
        if mine is not None:
            mine.pop(str(store.local_peer_id), None)
            if not mine:
                del store.providers[key]

    async def provide_file(self, sha256: bytes) -> bool:
        return await self.provide(file_provider_key(sha256))

    async def find_providers(self, key: str) -> list[PeerAddr]:
        """Providers of ``key``: the local store's and the network's (a GET_PROVIDERS walk).

        py-libp2p's ``find_providers`` returns the local store alone when it
        holds any record for the key, so a holder (its own record is local)
        never learnt of the others. The walk is a full one until it has a
        provider (protocol/_kadlookup.py, ``Lookup.found``): it goes on past
        the beta closest until the k closest have answered, so that a record
        on any of the k closest is found; with a provider it ends once the
        beta closest have answered, and at 20 providers at once.
        """
        kb = _encode_key(key)
        me = self._peer_id
        found: dict[str, PeerAddr] = {}
        for info in self._dht.provider_store.get_providers(kb):
            found[str(info.peer_id)] = PeerAddr(str(info.peer_id), tuple(str(a) for a in info.addrs[:MAX_ADDRS]))

        def others() -> int:
            return len(found) - (me in found)

        def on_reply(lookup: Lookup, peer: str, reply: Any) -> None:
            for p in self._wire.learn(reply.providerPeers):
                if others() < MAX_PEERS_PER_ANSWER:
                    found.setdefault(p.peer_id, p)
            lookup.found(others(), MAX_PEERS_PER_ANSWER)

        t0 = trio.current_time()
        lookup: Lookup | None = None
        with trio.move_on_after(DHT_TIMEOUT):
            lookup = await self._walk(kb, _GET_PROVIDERS, on_reply, need=_LOOKUP.beta if others() else _LOOKUP.k)
        if lookup is not None:
            log.debug("find providers: walk of %d queries, %d answers%s; %d providers", lookup.queries, lookup.answers,
                      " (cut by its budget)" if lookup.timed_out else "", others())
        if self.on_lookup is not None:
            self.on_lookup(trio.current_time() - t0)
        found.pop(me, None)
        return list(found.values())

    async def find_manifest_providers(self, manifest_id: bytes) -> list[PeerAddr]:
        return await self.find_providers(manifest_provider_key(manifest_id))

    async def find_file_providers(self, sha256: bytes) -> list[PeerAddr]:
        return await self.find_providers(file_provider_key(sha256))
