"""Budgets per peer (issue 11, items 6 and 7): what one peer may cost a node, without processes.

Sessions over memory streams, a real peerwire server and client on
127.0.0.1, dialling through a recording libp2p stand-in.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from autoglm.node._peerwire import serve_peerwire
from autoglm.node._store import Store
from autoglm.node.errors import SourceError
from autoglm.node.swarm import PeerBudget, Swarm, SwarmConfig
from autoglm.protocol._control import (
    Announce,
    Close,
    ControlConnection,
    Endpoint,
    GetManifest,
    Hello,
    KeyProof,
    ManifestData,
    ManifestState,
    PeerInfo,
    Peers,
    TokenRequest,
    swarm_key_proof,
)
from autoglm.protocol._errors import RemoteProtocolError
from autoglm.protocol._frames import NEED_DATA
from autoglm.protocol._peerwire import (
    _CLIENT_CODES,
    Cancel,
    PeerwireClient,
    PieceReceived,
    Rejected,
    Welcome,
    _frame,
)

from .test_peerwire_tcp import MID, PIECE, Tokens, _model
from .test_swarm_unit import IntroP2P, MemControlStream, RecordingFetch, _next


async def _settled() -> None:
    """Every task blocked for a moment: big control frames are decoded in a worker thread."""
    await trio.testing.wait_all_tasks_blocked(cushion=0.2)


class HangP2P(IntroP2P):
    """Dials that never complete (a third party that never answers), recorded."""

    async def open_control(self, peer: Any) -> Any:
        self.dialled.append(peer)
        await trio.sleep_forever()


async def _open(swarm: Swarm, nursery: trio.Nursery, name: str = "peerB", remote: str | None = None) -> tuple[MemControlStream, ControlConnection]:
    a, b = trio.testing.memory_stream_pair()
    ours = MemControlStream(a, name)
    if remote is not None:
        ours.remote_host = remote  # type: ignore[attr-defined]
    nursery.start_soon(swarm.serve_session, ours)
    theirs, conn = MemControlStream(b, "peerSelf"), ControlConnection(trio.current_time())
    assert isinstance(await _next(conn, theirs), Hello)
    return theirs, conn


# -- item 7: dialling where a peer says ----------------------------------------------


async def test_peers_messages_queue_bounded_dials_to_allowed_addresses(tmp_path: Path) -> None:
    """200 Peers messages with fresh ids: at most intro_dials_per_peer dials, none outside our scope."""
    p2p = HangP2P()
    swarm = Swarm(p2p, Store(tmp_path), SwarmConfig(intro_dial_delay=0.0))  # type: ignore[arg-type]
    mid = b"\x0b" * 32
    swarm.start_holding(mid, 2)
    swarm.attach(mid, RecordingFetch())
    addrs = ("/ip4/10.9.9.9/tcp/1", "/ip4/169.254.169.254/tcp/80", "/dns4/victim.example/tcp/80", "/ip4/127.0.0.1/tcp/9")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            swarm.use_nursery(nursery)
            theirs, conn = await _open(swarm, nursery)
            await theirs.send_all(conn.send(Hello((), None, b"t" * 16), 0.0))
            for m in range(200):
                infos = tuple(PeerInfo(f"zz{m:03d}{k:02d}", addrs) for k in range(50))
                await theirs.send_all(conn.send(Peers(mid, infos), 0.0))
            await trio.testing.wait_all_tasks_blocked()
            budget = swarm.config.budget
            assert 0 < len(p2p.dialled) <= budget.intro_dials_per_peer  # (8 run at once, the rest wait)
            # Only our own scope (loopback here): never the private, link-local or named hosts it gave.
            assert all(d.addrs == ("/ip4/127.0.0.1/tcp/9",) for d in p2p.dialled)
            assert len(swarm.dialer.intro_budget) == budget.intro_dials_per_peer
            nursery.cancel_scope.cancel()


async def test_an_address_outside_our_scope_is_never_dialled(tmp_path: Path) -> None:
    p2p = HangP2P()
    swarm = Swarm(p2p, Store(tmp_path), SwarmConfig(intro_dial_delay=0.0))  # type: ignore[arg-type]
    mid = b"\x0b" * 32
    swarm.start_holding(mid, 2)
    swarm.attach(mid, RecordingFetch())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            swarm.use_nursery(nursery)
            theirs, conn = await _open(swarm, nursery)
            await theirs.send_all(conn.send(Hello((), None, b"t" * 16), 0.0))
            bad = ("/ip4/192.168.0.1/tcp/22", "/ip6/fe80::1/tcp/22", "/ip4/0.0.0.0/tcp/1")
            await theirs.send_all(conn.send(Peers(mid, (PeerInfo("zzA", bad),)), 0.0))
            await trio.testing.wait_all_tasks_blocked()
            assert p2p.dialled == []
            nursery.cancel_scope.cancel()


async def test_peerwire_goes_to_the_session_ip_not_the_named_host(tmp_path: Path) -> None:
    """Hello names a third party's host: the token goes to where the session came from, on Hello's port."""
    swarm = Swarm(None, Store(tmp_path), SwarmConfig())  # type: ignore[arg-type]
    got: list[bytes] = []
    accepted = trio.Event()

    async def listener(stream: trio.SocketStream) -> None:
        got.append(await stream.receive_some(4096))
        accepted.set()
        await stream.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            [lst] = await nursery.start(functools.partial(trio.serve_tcp, listener, 0, host="127.0.0.1"))
            port = lst.socket.getsockname()[1]
            theirs, conn = await _open(swarm, nursery, remote="127.0.0.1")
            # 203.0.113.7 (TEST-NET-3) stands for a victim: nothing may be sent there.
            await theirs.send_all(conn.send(Hello((), Endpoint("203.0.113.7", port), b"T" * 32), 0.0))
            await trio.testing.wait_all_tasks_blocked()
            s = swarm.sessions["peerB"]
            with pytest.raises(SourceError):
                await s.peerwire()
            await accepted.wait()
            assert b"T" * 32 in got[0]
            nursery.cancel_scope.cancel()


async def test_no_peerwire_without_a_session_address(tmp_path: Path) -> None:
    swarm = Swarm(None, Store(tmp_path), SwarmConfig())  # type: ignore[arg-type]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            theirs, conn = await _open(swarm, nursery)
            await theirs.send_all(conn.send(Hello((), Endpoint("127.0.0.1", 9), b"T" * 32), 0.0))
            await trio.testing.wait_all_tasks_blocked()
            # Never the address the peer names: with no session IP (a relayed libp2p
            # connection) the only path left is peerwire over libp2p (node/swarm/relay.py).
            with pytest.raises(SourceError, match="relayed peerwire"):
                await swarm.sessions["peerB"].peerwire()
            nursery.cancel_scope.cancel()


# -- item 6: unbounded per-peer state -----------------------------------------------


@pytest.mark.parametrize(
    ("budget", "count", "pieces"),
    [
        (PeerBudget(announced_manifests=8), 9, 16),  # fresh ids
        (PeerBudget(announced_bitfield_bytes=1 << 20), 5, 2_000_000),  # 250 KB bitfields
    ],
)
async def test_announcing_beyond_the_budget_ends_the_session(tmp_path: Path, budget: PeerBudget, count: int, pieces: int) -> None:
    swarm = Swarm(None, Store(tmp_path), SwarmConfig(budget=budget))  # type: ignore[arg-type]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            theirs, conn = await _open(swarm, nursery)
            await theirs.send_all(conn.send(Hello((), None, b"t" * 16), 0.0))
            bits = b"\x00" * ((pieces + 7) // 8)
            for k in range(count - 1):
                await theirs.send_all(conn.send(Announce(ManifestState(bytes([k]) * 32, pieces, bits)), 0.0))
            await _settled()
            assert "peerB" in swarm.sessions  # within budget
            await theirs.send_all(conn.send(Announce(ManifestState(b"\xff" * 32, pieces, bits)), 0.0))
            await _settled()
            assert "peerB" not in swarm.sessions
            nursery.cancel_scope.cancel()


async def test_a_re_announce_replaces_and_does_not_add_up(tmp_path: Path) -> None:
    swarm = Swarm(None, Store(tmp_path), SwarmConfig(budget=PeerBudget(announced_bitfield_bytes=300_000)))  # type: ignore[arg-type]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            theirs, conn = await _open(swarm, nursery)
            await theirs.send_all(conn.send(Hello((), None, b"t" * 16), 0.0))
            state = ManifestState(b"\x01" * 32, 2_000_000, b"\x00" * 250_000)
            for _ in range(10):
                await theirs.send_all(conn.send(Announce(state), 0.0))
            await _settled()
            assert "peerB" in swarm.sessions
            nursery.cancel_scope.cancel()


async def test_tokens_per_peer_are_capped(tmp_path: Path) -> None:
    # The TokenRequest rate budget aside (test_rates_and_bans.py): live tokens alone.
    budget = PeerBudget(token_request_burst=10_000)
    swarm = Swarm(None, Store(tmp_path), SwarmConfig(budget=budget))  # type: ignore[arg-type]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            theirs, conn = await _open(swarm, nursery)
            await theirs.send_all(conn.send(Hello((), None, b"t" * 16), 0.0))
            for _ in range(2000):
                await theirs.send_all(conn.send(TokenRequest(), 0.0))
            for _ in range(2000):
                await _next(conn, theirs)
            assert swarm.serving.live_tokens("peerB") == swarm.config.budget.tokens
            nursery.cancel_scope.cancel()


def test_tokens_expire_and_connections_per_peer_are_capped(tmp_path: Path) -> None:
    async def main() -> None:
        swarm = Swarm(None, Store(tmp_path), SwarmConfig(budget=PeerBudget(tokens=8, peerwire_conns=2, token_ttl=60)))  # type: ignore[arg-type]
        serving = swarm.serving
        old = serving.issue_token("p")
        await trio.sleep(61)
        assert serving.redeem(old) is None  # expired
        grants = [serving.redeem(serving.issue_token("p")) for _ in range(3)]
        assert grants[0] is not None and grants[1] is not None and grants[2] is None  # two open at most
        assert serving.redeem(serving.issue_token("q")) is not None  # another peer's budget
        grants[0].release()
        grants[0].release()  # once only
        assert serving.open_conns("p") == 1
        assert serving.redeem(serving.issue_token("p")) is not None

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def _authed(port: int, token: bytes) -> tuple[trio.SocketStream, PeerwireClient]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = PeerwireClient()
    await stream.send_all(client.auth(token))
    while not isinstance(client.next_event(), Welcome):
        client.receive_data(await stream.receive_some(65536))
    return stream, client


async def test_a_cancel_for_an_id_never_requested_is_ignored(tmp_path: Path) -> None:
    """Cancels for ids never requested are not kept (they cancelled a later request with that id)."""
    loc, tokens = _model(tmp_path, 1), Tokens()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            _host, port = await nursery.start(serve_peerwire, loc, tokens.redeem)
            stream, client = await _authed(port, tokens.issue("a"))
            # Raw frames: an honest client never cancels what it did not request.
            await stream.send_all(b"".join(_frame([_CLIENT_CODES[Cancel], k]) for k in range(1, 5001)))
            await stream.send_all(client.request(7, MID, 0, PIECE, accept_zstd=False))
            while isinstance(ev := client.next_event(), type(NEED_DATA)):
                client.receive_data(await stream.receive_some(1 << 20))
            assert isinstance(ev, PieceReceived) and not isinstance(ev, Rejected)
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_an_idle_authenticated_connection_is_closed(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    loc, tokens = _model(tmp_path, 1), Tokens()
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            _host, port = await nursery.start(lambda task_status: serve_peerwire(loc, tokens.redeem, idle_timeout=120, task_status=task_status))
            tok = tokens.issue("a")
            grant = tokens.live[tok]
            stream, _client = await _authed(port, tok)
            t0 = trio.current_time()
            assert await stream.receive_some(10) == b""  # the server closed it
            assert 120 <= trio.current_time() - t0 < 130
            assert grant.released
            nursery.cancel_scope.cancel()


# -- item 5: GetManifest amplification ----------------------------------------------


class RecordingStream(MemControlStream):
    """The swarm's end of a session: every write it makes, by size."""

    def __init__(self, stream: Any, peer_id: str) -> None:
        super().__init__(stream, peer_id)
        self.writes: list[int] = []

    async def send_all(self, data: bytes) -> None:
        self.writes.append(len(data))
        await super().send_all(data)


async def _drain(conn: ControlConnection, stream: MemControlStream) -> list[object]:
    """Every message the swarm sends until it closes the session."""
    got: list[object] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            conn.receive_data(await stream.receive_some(), 0.0)
            continue
        if isinstance(ev, Close):
            return got
        got.append(ev)


async def test_get_manifest_replies_are_bounded(tmp_path: Path) -> None:
    """12 KB of GetManifest: each envelope at most once, the asker dropped, no write over ~1 MiB + one frame."""
    swarm = Swarm(None, Store(tmp_path), SwarmConfig())  # type: ignore[arg-type]
    envelope = b"E" * (1 << 20)
    mids = [bytes([k]) * 32 for k in range(8)]
    for mid in mids:
        swarm.start_holding(mid, 4, envelope=envelope)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = trio.testing.memory_stream_pair()
            ours = RecordingStream(a, "peerB")
            nursery.start_soon(swarm.serve_session, ours)
            theirs, conn = MemControlStream(b, "peerSelf"), ControlConnection(trio.current_time())
            await theirs.send_all(conn.send(Hello((), None, b"t" * 16), 0.0))
            requests = b"".join(conn.send(GetManifest(mids[k % 8]), 0.0) for k in range(300))
            assert 10_000 <= len(requests) <= 13_000
            await theirs.send_all(requests)
            got = await _drain(conn, theirs)
            replies = [m for m in got if isinstance(m, ManifestData)]
            assert sum(len(m.envelope) for m in replies) <= len(mids) * len(envelope)
            assert len({m.manifest_id for m in replies}) == len(replies)  # each once
            assert "peerB" not in swarm.sessions  # asked far faster than 64 a minute
            assert max(ours.writes) <= (1 << 20) + len(envelope) + 4096
            nursery.cancel_scope.cancel()


# -- item 12: the swarm key gates control sessions -----------------------------------


async def test_without_the_swarm_key_a_peer_learns_nothing(tmp_path: Path) -> None:
    """A keyed node sends only its proof; a peer that speaks without one gets no manifest id, token or envelope."""
    p2p = IntroP2P()
    swarm = Swarm(p2p, Store(tmp_path), SwarmConfig(swarm_key=b"k" * 32))  # type: ignore[arg-type]
    mid = b"\x07" * 32
    swarm.start_holding(mid, 4, [0, 1], envelope=b"E" * 1000)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(swarm.serve_session, MemControlStream(a, "peerB"))
            theirs, conn = MemControlStream(b, "peerSelf"), ControlConnection(trio.current_time())
            attack = conn.send(Hello((), None, b"t" * 16), 0.0) + conn.send(GetManifest(mid), 0.0)
            await theirs.send_all(attack)
            raw = b""
            while chunk := await theirs.receive_some():
                raw += chunk
            assert mid not in raw and b"E" * 1000 not in raw
            assert "peerB" not in swarm.sessions
            assert len(raw) < 64  # at most the proof's frame (the session may end before it is written)
            if raw:
                keyed = ControlConnection(0.0, key_proof=(b"\0" * 32, b"\0" * 32))
                keyed.receive_data(raw, 0.0)
                with pytest.raises(RemoteProtocolError, match="does not hold"):  # a KeyProof (for other ids)
                    keyed.next_event()
            nursery.cancel_scope.cancel()


async def test_two_holders_of_the_key_talk(tmp_path: Path) -> None:
    key = b"k" * 32
    p2p = IntroP2P()
    swarm = Swarm(p2p, Store(tmp_path), SwarmConfig(swarm_key=key))  # type: ignore[arg-type]
    mid = b"\x07" * 32
    swarm.start_holding(mid, 4, [0, 1])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(swarm.serve_session, MemControlStream(a, "peerB"))
            theirs = MemControlStream(b, "peerSelf")
            conn = ControlConnection(0.0, key_proof=(swarm_key_proof(key, "peerB", "peerSelf"), swarm_key_proof(key, "peerSelf", "peerB")))
            assert isinstance(await _next(conn, theirs), KeyProof)
            await theirs.send_all(conn.send(KeyProof(swarm_key_proof(key, "peerB", "peerSelf")), 0.0))
            hello = await _next(conn, theirs)
            assert isinstance(hello, Hello) and hello.manifests[0].manifest_id == mid
            await theirs.send_all(conn.send(Hello((), None, b"t" * 16), 0.0))
            await trio.testing.wait_all_tasks_blocked()
            assert swarm.sessions["peerB"].said_hello
            nursery.cancel_scope.cancel()


# -- decode off the event loop -----------------------------------------------------


async def test_big_control_frames_are_decoded_in_a_worker_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 250 KB bitfield's Announce is decoded off the event loop's thread; a Have inline."""
    import threading

    from autoglm.node.swarm import session as session_mod

    threads: list[tuple[int, bool]] = []
    real = session_mod.decode_control

    def spy(payload: bytes) -> Any:
        threads.append((len(payload), threading.current_thread() is threading.main_thread()))
        return real(payload)

    monkeypatch.setattr(session_mod, "decode_control", spy)
    swarm = Swarm(None, Store(tmp_path), SwarmConfig())  # type: ignore[arg-type]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            theirs, conn = await _open(swarm, nursery)
            await theirs.send_all(conn.send(Hello((), None, b"t" * 16), 0.0))
            await theirs.send_all(conn.send(Announce(ManifestState(b"\x01" * 32, 2_000_000, b"\x00" * 250_000)), 0.0))
            await _settled()
            nursery.cancel_scope.cancel()
    assert threads[0][1] is True  # the small Hello: inline
    assert threads[1][0] > 250_000 and threads[1][1] is False  # the big Announce: a worker thread
