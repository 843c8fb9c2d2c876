"""Fetch.drain (SIGTERM, #13 §5): the pieces in flight finish and are committed, no other piece starts."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import trio

from autoglm.node._engine import Fetch, FetchOptions
from autoglm.node._progress import Event, SourceFailed
from autoglm.node._sources import FetchRequest, PieceSink, SourceKind
from autoglm.node._store import Store

from .conftest import Published


class TricklingSource:
    """An in-memory mirror that sends each piece in 8 chunks, a little apart (a slow link)."""

    id = "mirror:trickle"
    kind = SourceKind.MIRROR

    def __init__(self, root: Path, gap: float) -> None:
        self.root = root
        self.gap = gap
        self.opened: list[int] = []  # pieces this source began to send, in order
        self.mid_piece = trio.Event()  # set once a piece is half sent

    def availability(self) -> Collection[int] | None:
        return None

    def max_requests(self) -> int:
        return 2

    def max_request_bytes(self) -> int:
        return 1 << 30

    def ready_at(self) -> float:
        return 0.0

    async def fetch(self, request: FetchRequest, sink: PieceSink) -> None:
        for p in request.pieces:
            data = (self.root / p.path).read_bytes()[p.offset : p.offset + p.length]
            w = sink.open_piece(p.index)
            self.opened.append(p.index)
            step = -(-len(data) // 8)
            for k in range(0, len(data), step):
                await w.write(data[k : k + step])
                if k >= len(data) // 2:
                    self.mid_piece.set()
                await trio.sleep(self.gap)
            await w.finish()

    async def aclose(self) -> None:
        return None


async def test_drain_finishes_the_pieces_in_flight_and_starts_none(published: Published, tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    dl = store.open_download(published.signed, tmp_path / "out")
    total = len(dl.missing())
    src = TricklingSource(published.root, gap=0.02)
    send, recv = trio.open_memory_channel[Event](1000)
    fetch = Fetch(store, dl, [src], send, FetchOptions(check_space=False, progress_interval=1e9))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch.run)
            await src.mid_piece.wait()
            in_flight = set(src.opened)
            fetch.drain()
            await fetch.drained()
            opened_at_drain_end = list(src.opened)
            nursery.cancel_scope.cancel()
    verified = store.verified_pieces(dl.manifest_id)
    assert in_flight <= verified  # every piece that was arriving is verified and recorded
    assert set(opened_at_drain_end) == in_flight  # no piece started after drain()
    assert len(verified) < total  # the fetch stopped, it did not run to the end
    send.close()
    failed = [ev async for ev in recv if isinstance(ev, SourceFailed)]
    assert failed == []  # stopping is nobody's fault
    store.close()
    # A restart resumes from there and ends with the published bytes.
    store = Store(tmp_path / "data")
    dl = store.open_download(published.signed, tmp_path / "out")
    assert set(dl.done) == verified
    with trio.fail_after(60):
        await Fetch(store, dl, [TricklingSource(published.root, gap=0.0)], options=FetchOptions(check_space=False)).run()
    published.assert_identical(tmp_path / "out")
    store.close()


async def test_drain_of_a_fetch_not_yet_fetching_returns_at_once(published: Published, tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    dl = store.open_download(published.signed, tmp_path / "out")
    fetch = Fetch(store, dl, [TricklingSource(published.root, gap=0.0)], options=FetchOptions(check_space=False))
    fetch.drain()
    with trio.fail_after(1):
        await fetch.drained()
    dl.close()
    store.close()
