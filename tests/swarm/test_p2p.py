"""node/_p2p: real py-libp2p hosts on 127.0.0.1 in one trio process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from autoglm.node._p2p import ControlStream, P2PNode, open_p2p
from autoglm.node.errors import RemoteProtocolError, SignatureError, SourceError
from autoglm.protocol import generate_private_key
from autoglm.protocol._bitfield import Bitfield
from autoglm.protocol._control import ControlConnection, Endpoint, Hello, ManifestState
from autoglm.protocol._frames import NEED_DATA
from autoglm.protocol._namerecord import NameRecord, sign_name_record

logging.getLogger("libp2p").setLevel(logging.CRITICAL)

MID = b"\x11" * 32


@asynccontextmanager
async def _nodes(tmp_path: Path, n: int) -> AsyncIterator[list[P2PNode]]:
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_p2p(tmp_path / "n0"))
        nodes = [first]
        for i in range(1, n):
            nodes.append(await stack.enter_async_context(open_p2p(tmp_path / f"n{i}", bootstrap=first.addrs())))
        yield nodes


async def test_identity_persists_and_addrs_are_loopback(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_p2p(tmp_path) as a:
            pid, addrs = a.peer_id, a.addrs()
        async with open_p2p(tmp_path) as b:
            assert b.peer_id == pid
    assert addrs and all(x.startswith("/ip4/127.0.0.1/tcp/") and x.endswith(f"/p2p/{pid}") for x in addrs)
    assert (tmp_path / "p2p-identity.key").stat().st_mode & 0o777 == 0o600


async def test_plaintext_peer_cannot_connect(tmp_path: Path) -> None:
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

    with trio.fail_after(30):
        async with open_p2p(tmp_path) as node:
            kp = create_new_key_pair()
            plain = new_host(key_pair=kp, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)})
            import multiaddr
            from libp2p.peer.peerinfo import info_from_p2p_addr

            async with plain.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                with pytest.raises(Exception):  # noqa: B017 - any libp2p failure to negotiate
                    await plain.connect(info_from_p2p_addr(multiaddr.Multiaddr(node.addrs()[0])))
            assert plain.get_id() not in [str(p) for p in node.connected_peers()]


async def test_dht_providers_between_three_hosts(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with _nodes(tmp_path, 3) as (a, b, c):
            assert await b.provide_manifest(MID)
            assert await b.provide_file(b"\x22" * 32)
            found = await c.find_manifest_providers(MID)
            assert [p.peer_id for p in found] == [b.peer_id]
            assert all(x.startswith("/ip4/127.0.0.1/") for x in found[0].addrs)
            assert [p.peer_id for p in await a.find_file_providers(b"\x22" * 32)] == [b.peer_id]
            assert await a.find_manifest_providers(b"\x33" * 32) == []


async def _pump(stream: ControlStream, conn: ControlConnection) -> Hello:
    while True:
        ev = conn.next_event()
        if isinstance(ev, Hello):
            return ev
        assert ev is NEED_DATA
        conn.receive_data(await stream.receive_some(), trio.current_time())


async def test_control_handshake_carries_token_and_endpoint(tmp_path: Path) -> None:
    got: dict[str, Hello] = {}
    with trio.fail_after(30):
        async with _nodes(tmp_path, 2) as (a, b):

            async def handler(stream: ControlStream) -> None:
                conn = ControlConnection(trio.current_time())
                got["server"] = await _pump(stream, conn)
                got["server_peer"] = stream.peer_id  # type: ignore[assignment]
                await stream.send_all(conn.send(Hello((), Endpoint("127.0.0.1", 7000), b"A" * 32), trio.current_time()))

            a.set_control_handler(handler)
            stream = await b.open_control(a.peer_id)
            conn = ControlConnection(trio.current_time())
            state = ManifestState(MID, 3, Bitfield(3, [1]).to_bytes())
            await stream.send_all(conn.send(Hello((state,), Endpoint("127.0.0.1", 7001), b"B" * 32), trio.current_time()))
            hello = await _pump(stream, conn)
            await stream.aclose()
    assert hello.token == b"A" * 32 and hello.endpoint == Endpoint("127.0.0.1", 7000)
    assert got["server"].token == b"B" * 32 and got["server"].manifests == (state,)
    assert got["server_peer"] == b.peer_id  # Noise authenticated who is on the other end


async def test_name_records_through_dht(tmp_path: Path) -> None:
    key = generate_private_key()
    with trio.fail_after(30):
        async with _nodes(tmp_path, 3) as (a, b, c):
            r1 = sign_name_record(key, "org/model", b"\x01" * 32, "1.0", 1)
            await a.put_name_record(r1)
            assert await c.get_name_record(r1.publisher, "org/model") == r1
            r2 = sign_name_record(key, "org/model", b"\x02" * 32, "1.1", 2)
            await b.put_name_record(r2)
            with pytest.raises(RemoteProtocolError):
                await b.put_name_record(r1)  # lower sequence number
            forged = NameRecord(r2.public_key, r2.name, b"\x09" * 32, r2.version, 3, r2.signature)
            with pytest.raises(SignatureError):
                await a.put_name_record(forged)
            # A node that stores a forged record behind the validator's back cannot
            # make others accept it: get_value validates what peers return.
            c2 = sign_name_record(key, "other", b"\x01" * 32, "1.0", 1)
            bad = NameRecord(c2.public_key, c2.name, b"\x07" * 32, c2.version, 5, c2.signature)
            a._dht.value_store.put(bad.key.encode(), bad.encode())
            assert await c.get_name_record(bad.publisher, "other") is None


async def test_dial_nobody_is_source_error(tmp_path: Path) -> None:
    # py-libp2p 0.8.1 keeps a closed host's listener open inside the same
    # process, so the dead address is a port nobody listens on.
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with trio.fail_after(30):
        async with open_p2p(tmp_path / "a") as a:
            pid = a.peer_id
        async with open_p2p(tmp_path / "b") as b:
            with pytest.raises(SourceError):
                await b.connect(f"/ip4/127.0.0.1/tcp/{port}/p2p/{pid}")


async def test_session_peers_are_protected_from_connection_trimming(tmp_path: Path) -> None:
    from libp2p.peer.id import ID

    with trio.fail_after(30):
        async with _nodes(tmp_path, 2) as (a, b):
            store = a._host.get_network().tag_store
            pid = ID.from_base58(b.peer_id)
            assert not store.is_protected(pid)
            a.protect(b.peer_id)
            assert store.is_protected(pid)
            a.protect(b.peer_id, on=False)
            assert not store.is_protected(pid)
