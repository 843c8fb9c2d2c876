"""The DHT's wire for our Kademlia client: one kademlia_pb2 message per stream, and the dials it needs.

:class:`KadWire` opens a DHT stream to a peer (dialling it in the
background if we hold no connection), sends one request and reads its
answer, and learns the peers an answer names. node/_kadclient.py's walks,
provides and finds are built on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from google.protobuf.message import DecodeError
from libp2p.exceptions import BaseLibp2pError
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.utils import maybe_consume_signed_record
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.utils.varint import encode_uvarint, read_varint_prefixed_bytes_limited

from autoglm.node.errors import RemoteProtocolError, SourceError

__all__ = ["MAX_ADDRS", "MAX_PEERS_PER_ANSWER", "KadWire", "PeerAddr"]

log = logging.getLogger("autoglm.node._kadclient")

_DIAL_TIMEOUT = 20.0  # a dial a query started goes on this long in the background
MAX_PEERS_PER_ANSWER = 20
MAX_ADDRS = 8
_ADDR_TTL = 3600


@dataclass(frozen=True, slots=True)
class PeerAddr:
    """A peer as the DHT reports it: its id and the multiaddrs it advertised."""

    peer_id: str
    addrs: tuple[str, ...]


class KadWire:
    """DHT requests to one peer at a time over ``host``; ``background`` (a nursery) carries the dials."""

    def __init__(self, host: Any, dht: KadDHT) -> None:
        self._host = host
        self._dht = dht
        # Dials our queries started, by peer, while they run (refresh_routing's nursery holds them).
        self._dials: dict[ID, trio.Event] = {}
        self.background: trio.Nursery | None = None

    def message(self, kind: int, key: bytes) -> Any:
        message = Message()
        message.type = kind  # type: ignore[assignment]
        message.key = key
        message.senderRecord = env_to_send_in_RPC(self._host)[0]
        return message

    async def rpc(self, peer: str, kind: int, key: bytes) -> Any:
        """One DHT request and its answer (a kademlia_pb2.Message); SourceError if the peer fails."""
        pid = ID.from_base58(peer)
        reply = Message()
        await self.send(pid, self.message(kind, key), reply)
        if reply.type != kind or not maybe_consume_signed_record(reply, self._host, pid):
            raise RemoteProtocolError(f"DHT peer {peer} sent a wrong answer or an invalid signed record")
        # It answered a DHT request: a DHT server, worth a routing-table entry.
        addrs = self._host.get_peerstore().addrs(pid)
        if addrs:
            await self._dht.routing_table.add_peer(PeerInfo(pid, addrs))
        return reply

    async def send(self, pid: ID, message: Any, reply: Any | None) -> None:
        """Send ``message`` on a new DHT stream and, if ``reply`` is given, parse the answer into it.

        The stream is always ended, even when the caller's scope is cancelled
        (a lookup that finished cancels its slower queries): py-libp2p's
        server reads a stream until it ends, holding one of its 12 handler
        slots, and resets every DHT stream beyond 12. Streams left open by
        cancelled queries had filled the bootstrap node's slots within
        seconds at 32 hosts.
        """
        data = message.SerializeToString()
        stream = None
        done = False
        stage, t0 = "open", trio.current_time()
        try:
            stream = await self._open_stream(pid)
            stage = "write"
            await stream.write(encode_uvarint(len(data)) + data)
            stage = "read"
            if reply is not None:
                reply.ParseFromString(await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE))
            done = True
        except (BaseLibp2pError, OSError, ValueError, DecodeError) as exc:
            raise SourceError(f"DHT query to {pid} failed: {exc!r}") from exc
        finally:
            if not done and log.isEnabledFor(logging.DEBUG):
                log.debug("DHT request to %s ended in %s after %.2f s", pid, stage, trio.current_time() - t0)
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await (stream.close() if done else stream.reset())
                    except (BaseLibp2pError, OSError):
                        pass

    async def _open_stream(self, pid: ID) -> Any:
        """A new DHT stream; once more on a fresh connection if the one we held was dead.

        Two hosts that dial each other at the same moment (their walks cross)
        each keep one of the two connections (one per peer) and often not the
        same one: each then holds a connection the other has closed, and
        learns it only when opening a stream fails with a reset or a broken
        pipe. That failure drops the dead connection, so the second try dials.
        In 16-host runs most failed queries were this.
        """
        await self._connection(pid)
        try:
            return await self._host.new_stream(pid, [KAD_PROTOCOL_ID])
        except (BaseLibp2pError, OSError) as exc:
            log.debug("DHT stream to %s failed (%r); trying a fresh connection", pid, exc)
        return await self._host.new_stream(pid, [KAD_PROTOCOL_ID])

    async def _connection(self, pid: ID) -> None:
        """Wait for a connection to ``pid``, dialling it in the background if there is none.

        The dial is not the query's: it goes on for up to 20 s after the
        query that started it gave up at its 5 s (and is shared by every walk
        of this host that wants the same peer). On a loaded machine a new
        connection (TCP, Noise, yamux, identify, all in Python) took 0.3-8 s;
        dialled inside the query, one that took longer than 5 s was thrown
        away with it, and the next walk to that peer started again from
        nothing. Raises SourceError if the dial failed.
        """
        if self.background is None or self._host.get_network().connections.get(pid):
            return
        event = self._dials.get(pid)
        if event is None:
            event = self._dials[pid] = trio.Event()
            self.background.start_soon(self._dial, pid, event)
        await event.wait()
        if not self._host.get_network().connections.get(pid):
            raise SourceError(f"DHT peer {pid} could not be dialled")

    async def _dial(self, pid: ID, event: trio.Event) -> None:
        try:
            with trio.move_on_after(_DIAL_TIMEOUT):
                await self._host.connect(PeerInfo(pid, self._host.get_peerstore().addrs(pid)))
        except Exception as exc:  # py-libp2p's dial raises assorted types; a background task must not
            log.debug("DHT dial to %s failed: %r", pid, exc)
        finally:
            del self._dials[pid]
            event.set()

    def learn(self, peers: Any) -> list[PeerAddr]:
        """Peers named in an answer (closer peers, providers): their addresses go to the peerstore."""
        out: list[PeerAddr] = []
        store = self._host.get_peerstore()
        me = self._host.get_id()
        for p in list(peers)[:MAX_PEERS_PER_ANSWER]:
            try:
                pid = ID(p.id)
                if pid == me or not maybe_consume_signed_record(p, self._host):
                    continue
                addrs = [multiaddr.Multiaddr(a) for a in p.addrs[:MAX_ADDRS]]
            except (BaseLibp2pError, ValueError, TypeError):
                continue
            if addrs:
                store.add_addrs(pid, addrs, _ADDR_TTL)
            out.append(PeerAddr(str(pid), tuple(str(a) for a in addrs)))
        return out
