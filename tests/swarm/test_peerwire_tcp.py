"""node/_peerwire over real 127.0.0.1 sockets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pytest
import trio

from autoglm.node._peerwire import (
    PeerRejected,
    PieceLocation,
    connect_peerwire,
    open_peerwire_connection,
    serve_peerwire,
)
from autoglm.node.errors import IntegrityError, SourceError
from autoglm.protocol._peerwire import RejectReason, verify_piece

MID = b"M" * 32
PIECE = 256 * 1024


@dataclass
class DirLocator:
    """A real on-disk piece table: one file cut into fixed pieces."""

    path: Path
    hashes: list[bytes]
    trusted: bool = False  # as if this process had verified and written every piece

    def locate(self, manifest_id: bytes, index: int) -> PieceLocation | None:
        if manifest_id != MID or not 0 <= index < len(self.hashes):
            return None
        return PieceLocation(self.path, index * PIECE, PIECE, self.hashes[index], self.trusted)


@dataclass
class Grant:
    peer_id: str
    sent: list[int] = field(default_factory=list)
    released: bool = False

    def check(self, manifest_id: bytes, index: int) -> RejectReason | None:
        return None

    def served(self, manifest_id: bytes, index: int, nbytes: int) -> None:
        self.sent.append(index)

    def release(self) -> None:
        self.released = True


class Tokens:
    def __init__(self) -> None:
        self.live: dict[bytes, Grant] = {}

    def issue(self, peer: str) -> bytes:
        tok = bytes([len(self.live)]) * 32
        self.live[tok] = Grant(peer)
        return tok

    def redeem(self, token: bytes) -> Grant | None:
        return self.live.pop(token, None)


def _model(tmp_path: Path, n: int = 8) -> DirLocator:
    data = blake3.blake3(b"seed").digest(length=n * PIECE)
    # Half the pieces are compressible, so both codecs travel.
    data = b"".join(data[i * PIECE : (i + 1) * PIECE] if i % 2 else b"\x07" * PIECE for i in range(n))
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    return DirLocator(path, [blake3.blake3(data[i * PIECE : (i + 1) * PIECE]).digest() for i in range(n)])


async def test_pipelined_verified_transfer(tmp_path: Path) -> None:
    loc, tokens = _model(tmp_path), Tokens()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_peerwire, loc, tokens.redeem)
            assert host == "127.0.0.1"
            got: dict[int, bytes] = {}
            async with open_peerwire_connection(host, port, tokens.issue("a")) as conn:

                async def one(i: int) -> None:
                    got[i] = await conn.fetch(MID, i, PIECE)

                for _round in range(2):  # the second round is served with sendfile
                    async with trio.open_nursery() as inner:
                        for i in range(8):
                            inner.start_soon(one, i)
                    for i in range(8):
                        verify_piece(got[i], loc.hashes[i])
                assert conn.bytes_received < 2 * 8 * PIECE  # zstd shrank the runs of 0x07
                with pytest.raises(PeerRejected) as exc:
                    await conn.fetch(MID, 99, PIECE)
                assert exc.value.reason is RejectReason.NOT_HAVE
            nursery.cancel_scope.cancel()


async def test_bad_and_reused_token_refused(tmp_path: Path) -> None:
    loc, tokens = _model(tmp_path, 1), Tokens()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_peerwire, loc, tokens.redeem)
            with pytest.raises(PeerRejected):
                async with open_peerwire_connection(host, port, b"x" * 32):
                    pass
            tok = tokens.issue("a")
            async with open_peerwire_connection(host, port, tok) as conn:
                await conn.fetch(MID, 0, PIECE)
            with pytest.raises(PeerRejected):
                async with open_peerwire_connection(host, port, tok):
                    pass
            nursery.cancel_scope.cancel()


async def test_piece_of_a_file_being_moved_into_place_is_still_served(tmp_path: Path) -> None:
    """The store may name the staging path for a moment after the rename: look again, do not refuse."""
    loc, tokens = _model(tmp_path, 2), Tokens()
    calls: list[int] = []

    class Moving:
        def locate(self, manifest_id: bytes, index: int) -> PieceLocation | None:
            calls.append(index)
            real = loc.locate(manifest_id, index)
            if real is None or len(calls) < 3:
                return None if real is None else PieceLocation(tmp_path / "gone.part", real.offset, real.length, real.hash)
            return real

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_peerwire, Moving(), tokens.redeem)
            async with open_peerwire_connection(host, port, tokens.issue("a")) as conn:
                verify_piece(await conn.fetch(MID, 1, PIECE), loc.hashes[1])
            nursery.cancel_scope.cancel()
    assert len(calls) == 3


@pytest.mark.parametrize("written_here", [False, True])
async def test_rotted_piece_on_disk(tmp_path: Path, written_here: bool) -> None:
    """Bytes that rotted on disk after their check.

    A piece this process did not write is hash-checked before its first serve
    and refused. A piece it verified and wrote itself goes out by sendfile as
    it lies on disk: the receiver's hash check (every received piece) catches
    it, and the server does not read and hash every piece twice.
    """
    loc, tokens = _model(tmp_path, 2), Tokens()
    loc.trusted = written_here
    data = bytearray(loc.path.read_bytes())
    data[PIECE + 10 : PIECE + 12] = b"\xff\xfe"
    loc.path.write_bytes(bytes(data))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_peerwire, loc, tokens.redeem)
            async with open_peerwire_connection(host, port, tokens.issue("a")) as conn:
                verify_piece(await conn.fetch(MID, 0, PIECE), loc.hashes[0])
                if not written_here:
                    with pytest.raises(PeerRejected):
                        await conn.fetch(MID, 1, PIECE)
                else:
                    got = await conn.fetch(MID, 1, PIECE)
                    assert bytes(got) == bytes(data[PIECE:])
                    with pytest.raises(IntegrityError):
                        verify_piece(got, loc.hashes[1])
            nursery.cancel_scope.cancel()


async def test_corrupting_server_is_caught_by_hash(tmp_path: Path) -> None:
    """A hostile server: its pieces are corrupted on disk and it calls them verified, so they go out unchecked."""
    loc, tokens = _model(tmp_path, 2), Tokens()
    data = bytearray(loc.path.read_bytes())
    for i in range(2):
        data[i * PIECE] ^= 0xFF
    bad = tmp_path / "corrupt.bin"
    bad.write_bytes(bytes(data))
    evil = DirLocator(bad, loc.hashes, trusted=True)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_peerwire, evil, tokens.redeem)
            async with open_peerwire_connection(host, port, tokens.issue("a")) as conn:
                for i in range(2):
                    got = await conn.fetch(MID, i, PIECE)
                    assert bytes(got) == bytes(data[i * PIECE : (i + 1) * PIECE])
                    with pytest.raises(IntegrityError):
                        verify_piece(got, loc.hashes[i])
            nursery.cancel_scope.cancel()


async def test_connect_refused_is_source_error() -> None:
    with trio.fail_after(10):
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        await listener.aclose()
        with pytest.raises(SourceError):
            async with open_peerwire_connection("127.0.0.1", port, b"t" * 32):
                pass


@pytest.mark.parametrize("client_psk", [b"k" * 32, b"x" * 32, None], ids=["same-key", "wrong-key", "no-key"])
async def test_private_swarm_aead(tmp_path: Path, client_psk: bytes | None) -> None:
    loc, tokens = _model(tmp_path, 4), Tokens()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(lambda task_status: serve_peerwire(
                loc, tokens.redeem, psk=b"k" * 32, task_status=task_status))
            if client_psk != b"k" * 32:
                with pytest.raises(SourceError):
                    async with open_peerwire_connection(host, port, tokens.issue("a"), psk=client_psk) as conn:
                        await conn.fetch(MID, 0, PIECE)
            else:
                async with open_peerwire_connection(host, port, tokens.issue("a"), psk=client_psk) as conn:
                    for _round in range(2):  # sealed serves never take the sendfile path
                        for i in range(4):
                            verify_piece(await conn.fetch(MID, i, PIECE), loc.hashes[i])
            nursery.cancel_scope.cancel()


async def test_peer_that_never_answers_is_a_source_error_after_the_stall_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    from trio.testing import memory_stream_pair

    from autoglm.node._peerwire import STALL_TIMEOUT, PeerwireConnection
    from autoglm.node._ratelimit import RateLimiter
    from autoglm.protocol._peerwire import PeerwireServer

    ours, theirs = memory_stream_pair()
    conn = PeerwireConnection(ours, RateLimiter(None))  # type: ignore[arg-type]
    srv = PeerwireServer()

    async def silent_peer() -> None:
        srv.receive_data(await theirs.receive_some())
        srv.next_event()
        await theirs.send_all(srv.accept())
        while await theirs.receive_some():  # takes requests, answers none
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(silent_peer)
        await conn._handshake(b"t" * 32, None)
        t0 = trio.current_time()
        with pytest.raises(SourceError, match="sent nothing"):
            await conn.fetch(MID, 0, PIECE)
        assert trio.current_time() - t0 == pytest.approx(STALL_TIMEOUT)
        assert conn.broken
        nursery.cancel_scope.cancel()


class StallOnce:
    """A download limiter that blocks its second caller until cancelled (mid-payload), then lets all through."""

    def __init__(self) -> None:
        self.calls = 0
        self.blocked = trio.Event()

    async def acquire(self, n: int) -> None:
        self.calls += 1
        if self.calls == 2:
            self.blocked.set()
            await trio.sleep_forever()


async def test_fetch_cancelled_mid_payload_leaves_the_connection_usable(tmp_path: Path) -> None:
    """A payload read with recv_into keeps its progress when its reader is cancelled (endgame, withdrawal)."""
    big = 4 * 1024 * 1024  # larger than one receive_some: the rest goes through recv_into
    data = blake3.blake3(b"big").digest(length=2 * big)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    hashes = [blake3.blake3(data[i * big : (i + 1) * big]).digest() for i in range(2)]

    class BigLocator:
        def locate(self, manifest_id: bytes, index: int) -> PieceLocation | None:
            return PieceLocation(path, index * big, big, hashes[index]) if index < 2 else None

    tokens, limiter = Tokens(), StallOnce()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_peerwire, BigLocator(), tokens.redeem)
            conn = await connect_peerwire(host, port, tokens.issue("a"), limiter)  # type: ignore[arg-type]
            try:
                async with trio.open_nursery() as inner:
                    cancelled = trio.CancelScope()

                    async def first() -> None:
                        with cancelled:
                            await conn.fetch(MID, 0, big)

                    inner.start_soon(first)
                    await limiter.blocked.wait()
                    cancelled.cancel()
                verify_piece(await conn.fetch(MID, 1, big), hashes[1])
                assert not conn.broken
            finally:
                await conn.aclose()
            nursery.cancel_scope.cancel()


async def test_raw_pieces_arrive_lined_up_with_their_file_offset(tmp_path: Path) -> None:
    # Pipelined, so one task's pump receives other requests' payloads: each buffer follows its own request.
    from autoglm.node._staging import DIRECT_ALIGN, _aligned

    loc, tokens = _model(tmp_path), Tokens()
    offsets = {1: 1264, 3: 263408, 5: 8 << 20, 7: 4095}  # the raw (incompressible) pieces, at safetensors-like offsets
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_peerwire, loc, tokens.redeem)
            async with open_peerwire_connection(host, port, tokens.issue("a")) as conn:
                got: dict[int, bytes | bytearray | memoryview] = {}

                async def one(i: int) -> None:
                    got[i] = await conn.fetch(MID, i, PIECE, offsets[i])

                async with trio.open_nursery() as inner:
                    for i in offsets:
                        inner.start_soon(one, i)
            for i, at in offsets.items():
                verify_piece(got[i], loc.hashes[i])
                head = -at % DIRECT_ALIGN
                assert isinstance(got[i], memoryview) and _aligned(got[i][head:]), i  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()
