"""The control API's event relay (node/_control_api.py ``_forward``): batched writes, nothing lost, order kept."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from autoglm.node._control_api import _forward
from autoglm.node._progress import Event, FetchDone, FileDone, PieceVerified, ProgressSnapshot

MID = bytes(32)


def _progress(done: int) -> ProgressSnapshot:
    return ProgressSnapshot(done, 100, done, 1.0)


def _piece(i: int) -> PieceVerified:
    return PieceVerified(MID, i, "mirror:a", 10, "f")


class _Recorder:
    """A memory send stream that keeps each write apart, with the (mock) time it happened."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, list[dict[str, Any]]]] = []
        self.stream = trio.testing.MemorySendStream(send_all_hook=self._hook)

    async def _hook(self) -> None:
        data = self.stream.get_data_nowait()
        self.writes.append((trio.current_time(), [json.loads(ln) for ln in data.splitlines()]))

    def events(self) -> list[dict[str, Any]]:
        return [ev for _, batch in self.writes for ev in batch]


def _run(body: Any) -> None:
    trio.run(body, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_burst_is_one_write_in_order_with_only_the_last_progress() -> None:
    rec = _Recorder()

    async def main() -> None:
        send, recv = trio.open_memory_channel[Event](64)
        async with trio.open_nursery() as n:
            n.start_soon(_forward, rec.stream, recv, 0.1)
            for ev in (_progress(0), _piece(0), _progress(10), _piece(1), FileDone("f", 20), _progress(20)):
                await send.send(ev)
            await trio.sleep(1)
            await send.aclose()

    _run(main)
    assert len(rec.writes) == 1
    t, batch = rec.writes[0]
    assert t == 0.1  # the first event waited one interval for the rest
    assert [e["event"] for e in batch] == ["piece", "piece", "file", "progress"]
    assert batch[-1]["bytes_done"] == 20  # the superseded snapshots are the ones left out
    assert [e["index"] for e in batch if e["event"] == "piece"] == [0, 1]


def test_the_end_of_the_fetch_flushes_at_once_and_nothing_is_dropped() -> None:
    rec = _Recorder()

    async def main() -> None:
        send, recv = trio.open_memory_channel[Event](64)
        async with trio.open_nursery() as n:
            n.start_soon(_forward, rec.stream, recv, 0.1)
            for i in range(3):
                await send.send(_piece(i))
                await trio.sleep(0.25)  # slower than the interval: a write each
            await send.send(_progress(100))
            await send.send(FetchDone(100, {"mirror:a": 100}, 1.0, 0, "/out"))
            await send.aclose()

    _run(main)
    assert [round(t, 3) for t, _ in rec.writes] == [0.1, 0.35, 0.6, 0.75]
    assert [e["event"] for e in rec.events()] == ["piece", "piece", "piece", "progress", "done"]


def test_a_cancelled_fetch_still_sends_what_it_said() -> None:
    rec = _Recorder()

    async def main() -> None:
        send, recv = trio.open_memory_channel[Event](64)
        async with trio.open_nursery() as n:
            n.start_soon(_forward, rec.stream, recv, 10.0)
            await send.send(_piece(7))
            await send.send(_progress(5))
            await trio.sleep(1)  # the forwarder holds them, waiting for more
            n.cancel_scope.cancel()

    _run(main)
    assert [e["event"] for e in rec.events()] == ["piece", "progress"]
    assert rec.writes[0][0] == 1.0
