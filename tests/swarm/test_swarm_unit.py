"""node/swarm without processes: sessions over memory streams, timers under MockClock, dialling with fake libp2p."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from autoglm.node._store import Store
from autoglm.node.swarm import Swarm, SwarmConfig
from autoglm.protocol._control import (
    ControlConnection,
    Hello,
    Interested,
    Keepalive,
    ManifestState,
    Unchoke,
)
from autoglm.protocol._frames import NEED_DATA


class MemControlStream:
    """A control stream over trio's in-memory streams, with the peer id Noise would give."""

    def __init__(self, stream: Any, peer_id: str) -> None:
        self._s = stream
        self.peer_id = peer_id

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        try:
            data: bytes = await self._s.receive_some(max_bytes)
        except trio.ClosedResourceError:
            return b""
        return data

    async def send_all(self, data: bytes) -> None:
        await self._s.send_all(data)

    async def aclose(self) -> None:
        await self._s.aclose()


async def _next(conn: ControlConnection, stream: MemControlStream) -> object:
    while (ev := conn.next_event()) is NEED_DATA:
        conn.receive_data(await stream.receive_some(), trio.current_time())
    return ev


def _session_with_peer_b(nursery: trio.Nursery, swarm: Swarm) -> tuple[MemControlStream, ControlConnection]:
    """A session between the swarm and "peerB" (opened by peerB): the test's end of the stream and its state."""
    a, b = trio.testing.memory_stream_pair()
    nursery.start_soon(swarm.serve_session, MemControlStream(a, "peerB"))
    return MemControlStream(b, "peerA"), ControlConnection(trio.current_time())


@pytest.fixture
def swarm(tmp_path: Path) -> Swarm:
    store = Store(tmp_path)
    return Swarm(None, store, SwarmConfig(keepalive_interval=15, idle_timeout=45, member_grace=0.3, first_round=0.3))  # type: ignore[arg-type]


async def test_session_keepalive_idle_timeout_and_unchoke(swarm: Swarm, autojump_clock: trio.testing.MockClock) -> None:
    mid = b"\x05" * 32
    swarm.start_holding(mid, 4, [0, 1])
    a, b = trio.testing.memory_stream_pair()
    ours, theirs = MemControlStream(a, "peerB"), MemControlStream(b, "peerA")
    peer = ControlConnection(trio.current_time())
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        nursery.start_soon(swarm.serve_session, ours)
        hello = await _next(peer, theirs)
        assert isinstance(hello, Hello)
        assert hello.manifests == (ManifestState(mid, 4, b"\xc0"),)
        assert swarm.serving.redeem(hello.token) is not None and swarm.serving.redeem(hello.token) is None  # one time
        await theirs.send_all(peer.send(Hello((), None, b"t" * 16), trio.current_time()))
        await theirs.send_all(peer.send(Interested(mid), trio.current_time()))
        await trio.testing.wait_all_tasks_blocked()
        swarm.rechoke()
        assert await _next(peer, theirs) == Unchoke()
        assert "peerB" in swarm.sessions and swarm.sessions["peerB"].unchoking
        # We said nothing for 15 s: a Keepalive goes out, exactly then.
        assert await _next(peer, theirs) == Keepalive()
        assert trio.current_time() - t0 == pytest.approx(15.0)
        # The peer stays silent: the session ends 45 s after its last message.
        with trio.fail_after(100):
            while True:
                data = await theirs.receive_some()
                if not data:
                    break
        assert trio.current_time() - t0 == pytest.approx(45.0)
        assert "peerB" not in swarm.sessions


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def test_pipeline_depth_follows_measured_throughput(swarm: Swarm) -> None:
    from autoglm.node.swarm import PeerSource

    class _S:  # the attributes PeerSource reads from its session for this
        pass

    sess = _S()
    sess.host = swarm  # type: ignore[attr-defined]
    sess.peer_id = "p"  # type: ignore[attr-defined]
    src = PeerSource(sess, b"\x00" * 32)  # type: ignore[arg-type]
    assert src.pipeline_depth() == swarm.config.pipeline  # nothing measured yet
    t = 0.0
    for _ in range(50):  # 8 MiB pieces every 0.1 s: 80 MiB/s -> 1 s of queue = 10 + 1
        src.measure(8 << 20, t)
        t += 0.1
    assert src.pipeline_depth() == 11
    for _ in range(50):  # a slow peer: one piece every 2 s
        src.measure(8 << 20, t)
        t += 2.0
    assert src.pipeline_depth() == PeerSource.MIN_DEPTH
    for _ in range(80):  # very fast: capped
        src.measure(8 << 20, t)
        t += 0.001
    assert src.pipeline_depth() == PeerSource.MAX_DEPTH


async def test_rate_limiter_paces_exactly(autojump_clock: trio.testing.MockClock) -> None:
    from autoglm.node._ratelimit import RateLimiter

    lim = RateLimiter(1_000_000, burst=100_000)
    t0 = trio.current_time()
    for _ in range(10):
        await lim.acquire(200_000)
    # 2 MB at 1 MB/s with a 0.1 MB burst: the last byte may go at 1.9 s.
    assert trio.current_time() - t0 == pytest.approx(1.9)
    unlimited = RateLimiter(None)
    t1 = trio.current_time()
    await unlimited.acquire(10**12)
    assert trio.current_time() == t1


async def test_hello_carries_64_manifests_and_the_rest_follow_as_announce(swarm: Swarm) -> None:
    from autoglm.protocol._control import Announce

    mids = [i.to_bytes(32, "big") for i in range(70)]
    for m in mids:
        swarm.start_holding(m, 9, [1])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            theirs, peer = _session_with_peer_b(nursery, swarm)
            hello = await _next(peer, theirs)
            assert isinstance(hello, Hello) and [st.manifest_id for st in hello.manifests] == mids[:64]
            rest = [await _next(peer, theirs) for _ in range(6)]
            assert rest == [Announce(ManifestState(m, 9, b"\x40\x00")) for m in mids[64:]]
            assert set(peer.theirs.manifests) == set(mids)
            nursery.cancel_scope.cancel()


class RecordingFetch:
    """A FetchHandle that records what the swarm tells it about the other fetchers."""

    def __init__(self) -> None:
        self.swarms: list[set[str]] = []
        self.complete: list[set[str]] = []
        self.progress: list[str] = []
        self.claims: list[tuple[str, list[int]]] = []  # Claims the swarm passed on
        self.mine: list[int] = []  # what mirror_claims reports
        self.relayed: list[set[str]] = []  # members known by peer exchange only

    def add_source(self, source: object) -> None:
        pass

    def remove_source(self, source_id: str) -> None:
        pass

    def source_have(self, source_id: str, index: int) -> None:
        pass

    def source_bitfield(self, source_id: str, indices: object) -> None:
        pass

    def set_swarm(self, peers: Any, complete: Any = (), relayed: Any = ()) -> None:
        self.swarms.append(set(peers))
        self.complete.append(set(complete))
        self.relayed.append(set(relayed))

    def peer_progress(self, peer: str, index: int) -> None:
        self.progress.append(peer)

    def peer_claims(self, peer: str, indices: Any) -> None:
        self.claims.append((peer, list(indices)))

    def mirror_claims(self) -> list[int]:
        return list(self.mine)


async def test_claims_reach_fetching_peers_both_ways(swarm: Swarm) -> None:
    """What we already asked a mirror for goes to a peer when it announces; new claims follow; theirs reach the fetch."""
    from autoglm.protocol._control import Claim

    mid = b"\x07" * 32
    swarm.start_holding(mid, 200)
    fetch = RecordingFetch()
    fetch.mine = list(range(70))  # more than one Claim holds
    swarm.attach(mid, fetch)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            theirs, peer = _session_with_peer_b(nursery, swarm)
            assert isinstance(await _next(peer, theirs), Hello)
            await theirs.send_all(peer.send(Hello((ManifestState(mid, 200, bytes(25)),), None, b"t" * 16), trio.current_time()))
            claims: list[Claim] = []  # Interested and Peers may come first
            while sum(len(c.indices) for c in claims) < 70:
                m = await _next(peer, theirs)
                if isinstance(m, Claim):
                    claims.append(m)
            assert [i for c in claims for i in c.indices] == list(range(70)) and all(c.manifest_id == mid for c in claims)
            swarm.post_claims(mid, [150, 151])  # what the engine calls when it asks a mirror
            while not isinstance(m := await _next(peer, theirs), Claim):
                pass
            assert m == Claim(mid, (150, 151))
            await theirs.send_all(peer.send(Claim(mid, (3, 4)), trio.current_time()))
            await trio.testing.wait_all_tasks_blocked()
            assert fetch.claims == [("peerB", [3, 4])]
            swarm.detach(mid)
            nursery.cancel_scope.cancel()


async def test_fetchers_share_the_first_copy(swarm: Swarm) -> None:
    """A peer fetching the same manifest joins the fetch's swarm; Have is progress; done, it is complete; gone, it leaves."""
    from autoglm.protocol._control import Have, Interested

    mid = b"\x07" * 32
    swarm.start_holding(mid, 2)
    fetch = RecordingFetch()
    swarm.attach(mid, fetch)
    assert fetch.swarms == [set()]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            swarm.use_nursery(nursery)
            theirs, peer = _session_with_peer_b(nursery, swarm)
            assert isinstance(await _next(peer, theirs), Hello)
            await theirs.send_all(peer.send(Hello((ManifestState(mid, 2, b"\x00"),), None, b"t" * 16), trio.current_time()))
            await trio.testing.wait_all_tasks_blocked()
            # Nothing of it and no Interested yet: a member for its first round (a fetcher's
            # Interested answers our Announce a round trip later) ...
            assert fetch.swarms[-1] == {"peerB"}
            await trio.sleep(swarm.config.first_round + 0.1)
            # ... then, still not fetching it (the publisher's node keeping an envelope), no member
            assert fetch.swarms[-1] == set()
            await theirs.send_all(peer.send(Interested(mid), trio.current_time()))  # it fetches
            await trio.testing.wait_all_tasks_blocked()
            assert fetch.swarms[-1] == {"peerB"}
            await theirs.send_all(peer.send(Have(mid, 0), trio.current_time()))
            await trio.testing.wait_all_tasks_blocked()
            assert fetch.progress == ["peerB"] and fetch.swarms[-1] == {"peerB"}
            await theirs.send_all(peer.send(Have(mid, 1), trio.current_time()))  # now complete
            await trio.testing.wait_all_tasks_blocked()
            assert fetch.swarms[-1] == set() and fetch.complete[-1] == {"peerB"}
            await theirs.aclose()
            await trio.testing.wait_all_tasks_blocked()
            # Gone: it stays a member for member_grace (a reset stream dialled again
            # must not move every owner twice), relayed (its pieces reach us through
            # others), then leaves.
            assert "peerB" not in swarm.sessions and fetch.complete[-1] == set() and fetch.relayed[-1] == {"peerB"}
            await trio.sleep(swarm.config.member_grace + 0.1)
            assert fetch.swarms[-1] == set() and fetch.complete[-1] == set() and fetch.relayed[-1] == set()
            nursery.cancel_scope.cancel()


async def test_a_member_whose_session_reset_stays_until_it_announces_again(swarm: Swarm) -> None:
    """Dialled again, its new Hello still on its way: still a member (before, it left the members until
    the Hello came, and every piece's owner moved twice); not announced by the end of the grace: gone."""
    from autoglm.protocol._control import Interested

    mid = b"\x0e" * 32
    swarm.start_holding(mid, 2)
    fetch = RecordingFetch()
    swarm.attach(mid, fetch)
    hello = Hello((ManifestState(mid, 2, b"\x00"),), None, b"t" * 16)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            swarm.use_nursery(nursery)
            theirs, peer = _session_with_peer_b(nursery, swarm)
            assert isinstance(await _next(peer, theirs), Hello)
            await theirs.send_all(peer.send(hello, trio.current_time()))
            await theirs.send_all(peer.send(Interested(mid), trio.current_time()))
            await trio.testing.wait_all_tasks_blocked()
            assert fetch.swarms[-1] == {"peerB"}
            await theirs.aclose()  # the stream reset ...
            await trio.testing.wait_all_tasks_blocked()
            again, peer = _session_with_peer_b(nursery, swarm)  # ... and peerB dialled again at once
            assert isinstance(await _next(peer, again), Hello)
            swarm.fetches.update_membership(mid)  # as any other peer's Announce or Interested does meanwhile
            assert "peerB" in swarm.sessions and fetch.relayed[-1] == {"peerB"}  # still a member (relayed)
            await trio.sleep(swarm.config.member_grace + 0.1)
            assert fetch.swarms[-1] == set() and fetch.relayed[-1] == set()  # in session, never said it holds it
            await again.send_all(peer.send(hello, trio.current_time()))
            await again.send_all(peer.send(Interested(mid), trio.current_time()))
            await trio.testing.wait_all_tasks_blocked()
            assert fetch.swarms[-1] == {"peerB"}
            nursery.cancel_scope.cancel()


class IntroP2P:
    """The slice of P2PNode that peer exchange uses: addresses from the peerstore, dials recorded."""

    peer_id = "peerSelf"

    def __init__(self) -> None:
        self.dialled: list[Any] = []

    def addrs(self) -> list[str]:
        return [f"/ip4/127.0.0.1/tcp/4000/p2p/{self.peer_id}"]

    def peer_addrs(self, peer_id: str, limit: int = 8) -> tuple[str, ...]:
        return (f"/ip4/127.0.0.1/tcp/4001/p2p/{peer_id}",)[:limit]

    def protect(self, peer_id: str, on: bool = True) -> None:
        pass

    async def open_control(self, peer: Any) -> Any:
        from autoglm.node.errors import SourceError

        self.dialled.append(peer)
        raise SourceError("not reachable in this test")


async def test_peer_exchange_introduces_holders_to_each_other(tmp_path: Path) -> None:
    """An empty node (a bootstrap) tells each node fetching a manifest about the others."""
    from autoglm.protocol._control import PeerInfo, Peers

    swarm = Swarm(IntroP2P(), Store(tmp_path), SwarmConfig())  # type: ignore[arg-type]
    mid, other = b"\x09" * 32, b"\x0a" * 32
    peers: dict[str, tuple[MemControlStream, ControlConnection]] = {}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            swarm.use_nursery(nursery)
            for name, held in (("peerB", mid), ("peerC", mid), ("peerD", other)):
                a, b = trio.testing.memory_stream_pair()
                conn = ControlConnection(trio.current_time())
                peers[name] = (MemControlStream(b, "peerSelf"), conn)
                nursery.start_soon(swarm.serve_session, MemControlStream(a, name))
                assert isinstance(await _next(conn, peers[name][0]), Hello)
                await peers[name][0].send_all(conn.send(Hello((ManifestState(held, 2, b"\x00"),), None, b"t" * 16), 0.0))
                await trio.testing.wait_all_tasks_blocked()
            c_stream, c_conn = peers["peerC"]
            assert await _next(c_conn, c_stream) == Peers(mid, (PeerInfo("peerB", ("/ip4/127.0.0.1/tcp/4001/p2p/peerB",)),))
            b_stream, b_conn = peers["peerB"]
            assert await _next(b_conn, b_stream) == Peers(mid, (PeerInfo("peerC", ("/ip4/127.0.0.1/tcp/4001/p2p/peerC",)),))
            # peerD holds another manifest: nobody is introduced to it, it to nobody.
            d_stream, d_conn = peers["peerD"]
            await d_stream.send_all(d_conn.send(Keepalive(), 0.0))
            await trio.testing.wait_all_tasks_blocked()
            assert d_conn.next_event() is NEED_DATA
            nursery.cancel_scope.cancel()


async def test_introduced_peers_are_dialled_only_for_a_wanted_manifest(tmp_path: Path) -> None:
    from autoglm.node._p2p import PeerAddr
    from autoglm.protocol._control import PeerInfo, Peers

    p2p = IntroP2P()
    swarm = Swarm(p2p, Store(tmp_path), SwarmConfig(intro_dial_delay=0.3))  # type: ignore[arg-type]
    mid, unwanted = b"\x0b" * 32, b"\x0c" * 32
    swarm.start_holding(mid, 2)
    swarm.attach(mid, RecordingFetch())
    a, b = trio.testing.memory_stream_pair()
    theirs, peer = MemControlStream(b, "peerSelf"), ControlConnection(trio.current_time())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            swarm.use_nursery(nursery)
            nursery.start_soon(swarm.serve_session, MemControlStream(a, "peerB"))
            assert isinstance(await _next(peer, theirs), Hello)
            await theirs.send_all(peer.send(Hello((), None, b"t" * 16), 0.0))
            intro = (PeerInfo("peerSelf", ("/ip4/127.0.0.1/tcp/1",)), PeerInfo("peerZ", ("/ip4/127.0.0.1/tcp/2",)))
            await theirs.send_all(peer.send(Peers(unwanted, (PeerInfo("peerF", ("/ip4/127.0.0.1/tcp/3",)),)), 0.0))
            await theirs.send_all(peer.send(Peers(mid, intro), 0.0))
            await theirs.send_all(peer.send(Peers(mid, intro), 0.0))  # again: the failed dial backs off
            await trio.testing.wait_all_tasks_blocked()
            # Only peerZ: not ourselves, not the peer of an unwanted manifest, and once.
            assert p2p.dialled == [PeerAddr("peerZ", ("/ip4/127.0.0.1/tcp/2",))]
            # A smaller peer id than ours is expected to dial us; we dial it only after a delay.
            await theirs.send_all(peer.send(Peers(mid, (PeerInfo("peerA", ("/ip4/127.0.0.1/tcp/5",)),)), 0.0))
            await trio.testing.wait_all_tasks_blocked()
            assert len(p2p.dialled) == 1
            await trio.sleep(0.4)
            assert p2p.dialled[1:] == [PeerAddr("peerA", ("/ip4/127.0.0.1/tcp/5",))]
            nursery.cancel_scope.cancel()


class WarmP2P(IntroP2P):
    """Connected peers and a routing table; opens succeed slowly (a stream each) and are counted."""

    peer_id = "peerM"

    def __init__(self, connected: list[str], table: list[str]) -> None:
        super().__init__()
        self.connected, self.table = connected, table
        self.streams: list[Any] = []

    def connected_peers(self) -> list[str]:
        return list(self.connected)

    def routing_peers(self) -> list[Any]:
        from autoglm.node._p2p import PeerAddr

        return [PeerAddr(p, (f"/ip4/127.0.0.1/tcp/1/p2p/{p}",)) for p in self.table]

    async def open_control(self, peer: Any) -> Any:
        from autoglm.node.errors import SourceError

        pid = getattr(peer, "peer_id", peer)
        self.dialled.append(pid)
        await trio.sleep(0.05)
        if pid.startswith("peerX"):
            raise SourceError("does not speak /autoglm/swarm/1")
        a, b = trio.testing.memory_stream_pair()
        self.streams.append(b)
        return MemControlStream(a, pid)


async def test_warm_sessions_connected_first_then_the_table_capped_smaller_id_first(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    p2p = WarmP2P(connected=["peerA", "peerZ", "peerX1"], table=["peerB", "peerC", "peerD"])
    swarm = Swarm(p2p, Store(tmp_path), SwarmConfig(warm_sessions=4))  # type: ignore[arg-type]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            swarm.use_nursery(nursery)
            nursery.start_soon(swarm.dialer.keep_warm)
            await trio.sleep(0.5)
            # Connected peers first; we (peerM) dial larger ids at once and leave the
            # smaller ones (peerA, peerB) 1 s to dial us first.
            assert sorted(p2p.dialled) == ["peerX1", "peerZ"]
            await trio.sleep(1)
            assert sorted(p2p.dialled) == ["peerA", "peerB", "peerX1", "peerZ"]
            await trio.sleep(3)
            assert set(swarm.sessions) == {"peerA", "peerB", "peerC", "peerZ"}  # the cap: 4
            assert "peerD" not in p2p.dialled
            n = p2p.dialled.count("peerX1")
            await trio.sleep(10)
            assert p2p.dialled.count("peerX1") == n  # a refusal is not asked again for a minute
            nursery.cancel_scope.cancel()


async def test_one_control_stream_open_per_peer_at_a_time(tmp_path: Path) -> None:
    p2p = WarmP2P(connected=[], table=[])
    swarm = Swarm(p2p, Store(tmp_path), SwarmConfig())  # type: ignore[arg-type]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            swarm.use_nursery(nursery)
            async with trio.open_nursery() as dials:
                for _ in range(3):  # a warm dial, a DHT lookup and an introduction at once
                    dials.start_soon(swarm.connect_peer, "peerB")
            assert p2p.dialled == ["peerB"] and "peerB" in swarm.sessions
            nursery.cancel_scope.cancel()


class AliasFetch(RecordingFetch):
    """A fetch of 4 pieces that records the sources the swarm gives it and their Haves."""

    def __init__(self, keys: list[tuple[bytes, int]]) -> None:
        super().__init__()
        self.keys = keys
        self.added: list[Any] = []
        self.haves: list[tuple[str, int]] = []

    def piece_keys(self) -> list[tuple[bytes, int]]:
        return self.keys

    def file_sha256s(self) -> list[bytes]:
        return []

    def add_source(self, source: Any) -> None:
        self.added.append(source)

    def source_have(self, source_id: str, index: int) -> None:
        self.haves.append((source_id, index))


async def test_a_peer_holding_our_pieces_under_another_manifest_becomes_an_alias_source(swarm: Swarm) -> None:
    """We ask for the envelope of a manifest we do not know, map pieces by hash, and use the peer for ours."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from autoglm.protocol import FileEntry, Manifest, Piece, key_id, sign_manifest
    from autoglm.protocol._control import GetManifest, Have, Interested, ManifestData, Unchoke

    key = Ed25519PrivateKey.generate()
    h = [bytes([i]) * 32 for i in range(5)]
    # Theirs: one file of 3 pieces (h1, h2, h4); ours: 4 pieces (h0, h1, h2, h3).
    theirs = Manifest("other", "9", 1, key_id(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)),
                      (FileEntry("w", 30, b"s" * 32, (Piece(0, 10, h[1]), Piece(10, 10, h[2]), Piece(20, 10, h[4]))),),
                      max_piece_size=10)
    envelope = sign_manifest(theirs, key).encode()
    other = sign_manifest(theirs, key).id
    mid = b"\x07" * 32
    swarm.start_holding(mid, 4)
    fetch = AliasFetch([(h[0], 10), (h[1], 10), (h[2], 10), (h[3], 10)])
    swarm.attach(mid, fetch)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            their_end, peer = _session_with_peer_b(nursery, swarm)
            assert isinstance(await _next(peer, their_end), Hello)
            # They hold their manifest's first piece (h1) only.
            await their_end.send_all(peer.send(Hello((ManifestState(other, 3, b"\x80"),), None, b"t" * 16), 0.0))
            while not isinstance(m := await _next(peer, their_end), GetManifest):
                pass
            assert m == GetManifest(other)
            await their_end.send_all(peer.send(ManifestData(other, envelope), 0.0))
            while not isinstance(m := await _next(peer, their_end), Interested):
                pass
            assert m == Interested(other)
            await their_end.send_all(peer.send(Unchoke(), 0.0))
            await trio.testing.wait_all_tasks_blocked()
            [src] = fetch.added
            assert src.id == f"peer:peerB@{other.hex()[:8]}" and set(src.availability()) == {1}
            await their_end.send_all(peer.send(Have(other, 1), 0.0))  # their piece 1 is our piece 2
            await trio.testing.wait_all_tasks_blocked()
            assert fetch.haves == [(src.id, 2)]
            nursery.cancel_scope.cancel()


async def _hello_session(
    nursery: trio.Nursery, swarm: Swarm, name: str, mid: bytes, interested: bool = False
) -> tuple[MemControlStream, ControlConnection]:
    """A session from ``name`` that announces ``mid`` (no pieces yet; fetching it if ``interested``); the test's end of it."""
    a, b = trio.testing.memory_stream_pair()
    conn = ControlConnection(trio.current_time())
    ours = MemControlStream(b, "peerSelf")
    nursery.start_soon(swarm.serve_session, MemControlStream(a, name))
    assert isinstance(await _next(conn, ours), Hello)
    await ours.send_all(conn.send(Hello((ManifestState(mid, 2, b"\x00"),), None, b"t" * 16), trio.current_time()))
    if interested:  # a peer that holds nothing and never says Interested is no member (protocol/_membership.py)
        await ours.send_all(conn.send(Interested(mid), trio.current_time()))
    await trio.testing.wait_all_tasks_blocked()
    return ours, conn


async def test_peer_exchange_feeds_relayed_members_and_departures_remove_them(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Holders named in Peers become relayed first-copy members; a Peers entry with no address removes one."""
    from autoglm.node.swarm.fetches import GOSSIP_SETTLE
    from autoglm.protocol._control import PeerInfo, Peers

    swarm = Swarm(IntroP2P(), Store(tmp_path), SwarmConfig(member_grace=0.3))  # type: ignore[arg-type]
    mid = b"\x0d" * 32
    swarm.start_holding(mid, 2)
    fetch = RecordingFetch()
    swarm.attach(mid, fetch)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            swarm.use_nursery(nursery)
            theirs, peer = await _hello_session(nursery, swarm, "peerB", mid, interested=True)
            assert fetch.swarms[-1] == {"peerB"} and fetch.relayed[-1] == set()
            addr = ("/ip4/127.0.0.1/tcp/4001/p2p/peerR",)
            await theirs.send_all(peer.send(Peers(mid, (PeerInfo("peerR", addr), PeerInfo("peerB", addr))), 0.0))
            await trio.testing.wait_all_tasks_blocked()
            assert fetch.relayed[-1] == set()  # applied once GOSSIP_SETTLE is over (one re-rank per burst)
            await trio.sleep(GOSSIP_SETTLE + 0.1)
            # peerR has no session here (its dial fails in this test): relayed; peerB is in session: not relayed.
            assert fetch.relayed[-1] == {"peerR"} and fetch.swarms[-1] == {"peerB"}
            await theirs.send_all(peer.send(Peers(mid, (PeerInfo("peerR", ()),)), 0.0))  # peerR left
            await trio.sleep(GOSSIP_SETTLE + 0.1)
            assert fetch.relayed[-1] == set()
            nursery.cancel_scope.cancel()


async def test_a_holder_that_leaves_is_announced_gone_after_member_grace(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The introducer tells the other holders when one leaves (and does not come back within member_grace)."""
    from autoglm.protocol._control import PeerInfo, Peers

    swarm = Swarm(IntroP2P(), Store(tmp_path), SwarmConfig(member_grace=0.3))  # type: ignore[arg-type]
    mid = b"\x0e" * 32
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            swarm.use_nursery(nursery)
            b_stream, b_conn = await _hello_session(nursery, swarm, "peerB", mid)
            c_stream, c_conn = await _hello_session(nursery, swarm, "peerC", mid)
            intro = await _next(b_conn, b_stream)
            assert isinstance(intro, Peers) and intro.peers[0].peer_id == "peerC" and intro.peers[0].addrs
            await c_stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(0.25):  # within the grace: nothing yet
                msg = await _next(b_conn, b_stream)
                raise AssertionError(f"early: {msg}")
            assert await _next(b_conn, b_stream) == Peers(mid, (PeerInfo("peerC", ()),))
            nursery.cancel_scope.cancel()
