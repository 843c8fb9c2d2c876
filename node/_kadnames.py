"""Signed name records in the DHT: put, and resolve against the local store and the closest peers.

py-libp2p's ``KadDHT`` keeps the value store and answers other nodes'
GET_VALUE/PUT_VALUE; :class:`NameRecords` is this node's client side,
with the validity rules of protocol/_namerecord.py (signature, higher
sequence number wins). ``P2PNode`` (node/_p2p.py) builds it beside the
``KadClient`` whose walks find the closest peers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID

from autoglm.node._kadclient import DHT_TIMEOUT, PEER_QUERY_TIMEOUT
from autoglm.node.errors import RemoteProtocolError
from autoglm.protocol._namerecord import (
    NameRecord,
    check_name_update,
    name_key,
    select_name_record,
    verify_name_record,
)

__all__ = ["NameRecords"]

log = logging.getLogger(__name__)

_VALUE_QUERY_PEERS = 20  # closest peers asked for a name record (Kademlia's k)


class NameRecords:
    """Put and resolve signed name records; ``closest`` is a bounded FIND_NODE walk (``KadClient.closest_peers``)."""

    def __init__(self, host: Any, dht: KadDHT, closest: Callable[[bytes, float], Awaitable[list[str]]]) -> None:
        self._host = host
        self._dht = dht
        self._closest = closest

    async def put(self, record: NameRecord) -> None:
        """Store a signed record locally and at the closest peers; refuses a lower seq."""
        old = self._dht.value_store.get(record.key.encode())
        check_name_update(record.key, old.value if old else None, record.encode())
        try:
            with trio.fail_after(DHT_TIMEOUT):
                await self._dht.put_value(record.key, record.encode())
        except ValueError as exc:
            raise RemoteProtocolError(str(exc)) from exc

    async def get(self, publisher_key_id: str, name: str) -> NameRecord | None:
        """The best valid record among ours and the network's, or None. Invalid values are skipped.

        Strategy: py-libp2p's ``get_value`` answers from the local store first,
        and any peer can PUT_VALUE an old, validly signed record to a node that
        holds none. So the local record is only one candidate: the closest
        peers are asked too, the highest valid sequence number wins, and a
        newer record found on the network replaces the local one.
        """
        key = name_key(publisher_key_id, name)
        key_bytes = key.encode()
        local = self._dht.value_store.get(key_bytes)
        values = [local.value] if local is not None else []
        with trio.move_on_after(DHT_TIMEOUT):
            values += await self._values_from_peers(key_bytes)
        if not values:
            return None
        try:
            best = values[select_name_record(key, values)]
        except RemoteProtocolError:
            log.warning("ignoring invalid name records for %s", key)
            return None
        if local is None or best != local.value:
            self._dht.value_store.put(key_bytes, best)
        return verify_name_record(key, best)

    async def _values_from_peers(self, key_bytes: bytes) -> list[bytes]:
        """What the closest peers hold under ``key_bytes``; a silent peer costs one query timeout.

        Strategy: the peers we already know (the routing table's closest and
        the connected ones) are asked at once, while the network lookup for
        closer ones runs beside them with a bound of its own: py-libp2p's
        lookup waits for every peer of a round, so one peer that connected and
        went silent held it, and the whole resolution, for the full DHT timeout
        (issue 11, item 13). Peers the lookup finds in time are asked too.
        """
        me = self._host.get_id()
        found: list[bytes] = []
        asked: set[ID] = {me}

        async def ask(peer: ID) -> None:
            with trio.move_on_after(PEER_QUERY_TIMEOUT):
                try:
                    value = await self._dht.value_store._get_from_peer(peer, key_bytes)
                except (BaseLibp2pError, OSError) as exc:
                    log.debug("value query to %s failed: %r", peer, exc)
                    return
                if isinstance(value, bytes):
                    found.append(value)

        def ask_all(nursery: trio.Nursery, peers: Iterable[ID]) -> None:
            for peer in peers:
                if peer not in asked and len(asked) <= _VALUE_QUERY_PEERS:
                    asked.add(peer)
                    nursery.start_soon(ask, peer)

        async def lookup(nursery: trio.Nursery) -> None:
            closest = await self._closest(key_bytes, PEER_QUERY_TIMEOUT)
            ask_all(nursery, [ID.from_base58(p) for p in closest])

        known = self._dht.routing_table.find_local_closest_peers(key_bytes, _VALUE_QUERY_PEERS)
        async with trio.open_nursery() as nursery:
            ask_all(nursery, [*known, *self._host.get_connected_peers()])
            nursery.start_soon(lookup, nursery)
        return found
