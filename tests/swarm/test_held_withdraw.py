"""Held.withdraw re-reads the store in a worker thread: what happens meanwhile is not lost."""

from __future__ import annotations

import threading

import trio

from autoglm.node.swarm.held import Held
from autoglm.protocol._bitfield import Bitfield

MID, N = b"m" * 32, 8


class BlockingStore:
    """The store's bitfield as read: ``pieces``; the read returns only when the test says so."""

    def __init__(self, pieces: list[int]) -> None:
        self.pieces = pieces
        self.read = threading.Event()
        self.go = threading.Event()

    def bitfield(self, mid: bytes) -> bytes:
        bits = Bitfield(N, self.pieces).to_bytes()
        self.read.set()
        self.go.wait(5)
        return bits


async def _withdraw_while(store: BlockingStore, held: Held, meanwhile: object) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(held.withdraw, MID)
        await trio.to_thread.run_sync(store.read.wait)
        assert callable(meanwhile)
        meanwhile()
        store.go.set()


async def test_a_piece_verified_during_the_read_stays_held() -> None:
    # gc removed pieces 4-7 of one copy; the running fetch verifies piece 5 again meanwhile.
    store = BlockingStore([0, 1, 2, 3])
    held = Held(store)  # type: ignore[arg-type]
    held.start_holding(MID, N, range(7))
    news: list[bool] = []
    await _withdraw_while(store, held, lambda: news.append(held.add_piece(MID, 7)))
    assert news == [True]  # peers were told Have(7)
    assert sorted(held.have(MID) or ()) == [0, 1, 2, 3, 7]  # 4-6 withdrawn, 7 kept
    assert not held.add_piece(MID, 7)


async def test_an_empty_read_does_not_drop_a_hold_that_started_meanwhile() -> None:
    store = BlockingStore([])
    held = Held(store)  # type: ignore[arg-type]
    held.start_holding(MID, N, [0])

    def restart() -> None:  # the manifest's last copy went; a new fetch of it started holding
        held._held.pop(MID)
        assert held.start_holding(MID, N, [])
        held.add_piece(MID, 2)

    await _withdraw_while(store, held, restart)
    assert MID in held
    assert sorted(held.have(MID) or ()) == [2]
