"""Mirror quality switching at the engine level: two real HTTP mirrors on 127.0.0.1, one degrades mid-fetch.

Mirror A answers late (RTT far over the 200 ms threshold), then with 429s, then
recovers; mirror B stays healthy. The load moves to B while A is degraded (A keeps
one request: the probe) and comes back to A when it recovers. The timeline it
records is the one docs/benchmarks.md shows (bench/wan_bench.py --switch runs the
same over the WAN bed).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from fetch.conftest import publish
from fetch.faultserver import FaultServer

from autoglm.node._mirrors import MirrorConfig
from autoglm.node.api import FetchOptions, NodeConfig, open_node

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
HEALTHY, SLOW = 0.08, 0.4


class CountingServer(FaultServer):
    """FaultServer that records (time, requests in flight) at each request start and end."""

    def __init__(self, root: Path, prefix: str) -> None:
        super().__init__(root, prefix)
        self.in_flight = 0
        self.trace: list[tuple[float, int]] = []
        self._cache: dict[str, bytes | None] = {}
        self.first = trio.Event()

    def _body_of(self, rel: str) -> bytes | None:  # read each file once, not once per range request
        if rel not in self._cache:
            self._cache[rel] = super()._body_of(rel)
        return self._cache[rel]

    async def _respond(self, stream: trio.SocketStream, method: str, target: str, headers: dict[str, str],
                       reused: bool = False) -> bool:
        self.in_flight += 1
        self.trace.append((trio.current_time(), self.in_flight))
        self.first.set()
        try:
            return await super()._respond(stream, method, target, headers, reused)
        finally:
            self.in_flight -= 1


def _peak(trace: list[tuple[float, int]], t0: float, t1: float) -> int:
    return max((n for t, n in trace if t0 <= t < t1), default=0)


async def test_load_moves_off_a_degraded_mirror_and_comes_back(tmp_path: Path) -> None:
    pub = publish(tmp_path, size=64 * MiB, piece=128 << 10)
    a, b = CountingServer(pub.root, "/a/"), CountingServer(pub.root, "/b/")
    a.delay = b.delay = HEALTHY
    cfg = MirrorConfig(initial_connections=4, max_connections=4, max_request_bytes=128 << 10,
                       backoff_base=0.05, backoff_cap=0.5, retry_after_cap=1.0)
    marks: dict[str, float] = {}

    async def script() -> None:
        await a.first.wait()
        t0 = marks["start"] = trio.current_time()
        await trio.sleep_until(t0 + 1.0)
        marks["slow"] = trio.current_time()
        a.delay = SLOW  # RTT to 400 ms
        await trio.sleep_until(t0 + 2.0)
        marks["429"] = trio.current_time()
        a.add("429", count=2, retry_after=1)
        await trio.sleep_until(t0 + 4.0)
        marks["recovered"] = trio.current_time()
        a.delay = HEALTHY

    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        nursery.start_soon(script)
        async with open_node(NodeConfig(tmp_path / "data", cfg)) as node:
            with trio.fail_after(90):
                await node.fetch(pub.manifest_path, out=tmp_path / "out", trust=pub.trust,
                                 mirrors=[a.url, b.url], options=FetchOptions(space_margin=0))
        marks["done"] = trio.current_time()
        nursery.cancel_scope.cancel()
    pub.assert_identical(tmp_path / "out")
    assert "recovered" in marks and marks["done"] > marks["recovered"] + 1.0, marks

    # healthy: A carries its full width
    assert _peak(a.trace, marks["start"], marks["slow"]) >= 3
    # degraded (slow, then 429s): after the requests already sent return (one slow RTT and a
    # little), A holds one request at a time, the probe; B keeps its full width
    assert _peak(a.trace, marks["slow"] + 2 * SLOW + 0.3, marks["recovered"]) <= 1, a.trace
    assert _peak(b.trace, marks["slow"], marks["recovered"]) >= 3
    # the 429s were seen and honoured
    assert [s for _, s, _ in a.stats.log].count(429) == 2
    # recovered: A gets more than one request again before the fetch ends
    back = next((t for t, n in a.trace if t > marks["recovered"] and n >= 2), None)
    assert back is not None, "A never got its load back"
    t0 = marks["start"]
    print("\nmirror switch timeline (s from the first request): "
          + ", ".join(f"{k} {v - t0:.2f}" for k, v in marks.items())
          + f", A back to >=2 in flight at {back - t0:.2f}"
          + f"; A's last burst >1 in flight after slowing: {max((t - t0 for t, n in a.trace if marks['slow'] < t < marks['recovered'] and n >= 2), default=0):.2f}")
