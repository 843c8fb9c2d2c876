"""A trickling peer (issue 11, item 14): the engine takes its requests back within seconds.

A real fetch engine and store; two peer sources implementing the source
interface: an honest one serving the published bytes, and an adversary that
sends one byte every 5 s (never silent long enough for a stall timeout).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import trio
from fetch.conftest import Published, publish

from autoglm.node._engine import Fetch, FetchOptions
from autoglm.node._sources import FetchRequest, PieceSink, SourceKind
from autoglm.node._store import Store


class _Peer:
    kind = SourceKind.PEER

    def __init__(self, sid: str, depth: int) -> None:
        self.id = sid
        self._depth = depth
        self.requested: list[int] = []

    def availability(self) -> Collection[int] | None:
        return None

    def max_requests(self) -> int:
        return self._depth

    def max_request_bytes(self) -> int:
        return 1

    def ready_at(self) -> float:
        return 0.0

    async def aclose(self) -> None:
        return None


class HonestPeer(_Peer):
    def __init__(self, root: Path) -> None:
        super().__init__("peer:honest", 2)
        self._root = root

    async def fetch(self, request: FetchRequest, sink: PieceSink) -> None:
        for p in request.pieces:
            self.requested.append(p.index)
            await trio.sleep(0.01)
            await sink.put(p.index, (self._root / p.path).read_bytes()[p.offset : p.offset + p.length])


class TricklingPeer(_Peer):
    """One byte of the right data every 5 s: never silent for 15 s, never done."""

    def __init__(self, root: Path) -> None:
        super().__init__("peer:trickle", 8)
        self._root = root

    async def fetch(self, request: FetchRequest, sink: PieceSink) -> None:
        for p in request.pieces:
            self.requested.append(p.index)
            data = (self._root / p.path).read_bytes()[p.offset : p.offset + p.length]
            w = sink.open_piece(p.index)
            for k in range(len(data)):
                await w.write(data[k : k + 1])
                await trio.sleep(5)


async def test_a_trickling_peer_loses_its_requests_within_seconds(tmp_path: Path) -> None:
    pub: Published = publish(tmp_path, size=1 << 20)
    store = Store(tmp_path / "data")
    dl = store.open_download(pub.signed, tmp_path / "out")
    honest, trickle = HonestPeer(pub.root), TricklingPeer(pub.root)
    # No endgame duplicates: only the slow-source rule can take pieces from the trickler.
    opts = FetchOptions(check_space=False, endgame_copies=1, progress_interval=1e9)
    with trio.fail_after(20):
        t0 = trio.current_time()
        result = await Fetch(store, dl, [trickle, honest], options=opts).run()
        took = trio.current_time() - t0
    store.close()
    pub.assert_identical(tmp_path / "out")
    assert trickle.requested, "the trickler was never asked (the test proves nothing)"
    assert result.bytes_by_source.get("peer:trickle", 0) == 0
    assert took < 10.0, took
