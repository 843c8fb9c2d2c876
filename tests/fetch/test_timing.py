"""Backoff and scoring: pure arithmetic, and the engine honouring Retry-After under MockClock."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from pathlib import Path

import trio
import trio.testing

from autoglm.node._engine import Fetch, FetchOptions
from autoglm.node._mirrors import MirrorConfig, MirrorScore, RetryLater
from autoglm.node._sources import FetchRequest, PieceSink, SourceKind
from autoglm.node._store import Store

from .conftest import Published


def test_backoff_doubles_with_jitter_and_honours_retry_after() -> None:
    cfg = MirrorConfig(backoff_base=1.0, backoff_cap=8.0)
    s = MirrorScore(cfg)
    rng = random.Random(1)
    delays = []
    for _ in range(6):
        s.ready_at = 0.0
        s.on_failure(100.0, rng)
        delays.append(s.ready_at - 100.0)
    for k, d in enumerate(delays):
        base = min(8.0, 2.0**k)
        assert 0.5 * base <= d <= 1.5 * base
    s.ready_at = 0.0
    s.on_failure(100.0, rng, retry_after=120.0)
    assert s.ready_at == 220.0
    s.ready_at = 0.0
    s.on_failure(100.0, rng, retry_after=10_000.0)
    assert s.ready_at == 100.0 + cfg.retry_after_cap


def test_degraded_thresholds_and_recovery() -> None:
    s = MirrorScore(MirrorConfig(initial_connections=4))
    assert not s.degraded and s.allowed_requests(True) == 4
    s.on_response(0.35)
    assert s.degraded and s.allowed_requests(others_healthy=True) == 1
    assert s.allowed_requests(others_healthy=False) >= 1
    s = MirrorScore(MirrorConfig(initial_connections=4))
    s.on_failure(0.0, random.Random(0))  # one error in ten: 10% > 5%
    assert s.degraded
    for _ in range(30):
        s.on_success(1.0, 1 << 20, 0.01)
    assert not s.degraded  # probing succeeded: the mirror is trusted again


def test_connections_grow_when_each_is_rate_limited() -> None:
    s = MirrorScore(MirrorConfig(initial_connections=4, max_connections=6, per_connection_floor=64e6))
    for _ in range(5):
        s.on_success(0.0, 20 << 20, 1.0)  # 20 MB/s per connection: a limit_rate server
    assert s.connections == 6
    s2 = MirrorScore(MirrorConfig(initial_connections=4))
    s2.on_success(0.0, 1 << 30, 1.0)
    assert s2.connections == 4


class FlakySource:
    """In-memory mirror: the first request answers 429 Retry-After 30, then serves."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.score = MirrorScore(MirrorConfig())
        self.starts: list[float] = []

    id = "mirror:mem"
    kind = SourceKind.MIRROR

    def availability(self) -> Collection[int] | None:
        return None

    def max_requests(self) -> int:
        return 1

    def max_request_bytes(self) -> int:
        return 1 << 30

    def ready_at(self) -> float:
        return self.score.ready_at

    async def fetch(self, request: FetchRequest, sink: PieceSink) -> None:
        self.starts.append(trio.current_time())
        if len(self.starts) == 1:
            self.score.on_failure(trio.current_time(), random.Random(0), retry_after=30.0)
            raise RetryLater("429", 30.0)
        for p in request.pieces:
            data = (self.root / p.path).read_bytes()[p.offset : p.offset + p.length]
            await sink.put(p.index, data)

    async def aclose(self) -> None:
        return None


async def test_engine_waits_exactly_retry_after(published: Published, tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    store = Store(tmp_path / "data")
    dl = store.open_download(published.signed, tmp_path / "out")
    src = FlakySource(published.root)
    seq: Sequence[FlakySource] = [src]
    # No fail_after here: autojump would leap to its deadline while a commit runs in a
    # worker thread. pytest-timeout bounds the test; the ticker is pushed out of the way.
    await Fetch(store, dl, seq, options=FetchOptions(check_space=False, progress_interval=1e9)).run()
    store.close()
    published.assert_identical(tmp_path / "out")
    assert src.starts[1] - src.starts[0] == 30.0


def test_mirror_connections_are_shared_out_across_the_swarm(published: Published, tmp_path: Path) -> None:
    """Alone, a node may use all of a mirror's connections; among n fetchers, about 16 / n each (at least 2)."""
    store = Store(tmp_path / "data")
    dl = store.open_download(published.signed, tmp_path / "out")
    src = FlakySource(published.root)
    src.max_requests = lambda: 16  # type: ignore[method-assign]
    fetch = Fetch(store, dl, [src], options=FetchOptions(check_space=False))

    async def main() -> list[int]:
        got = [fetch.scheduler.max_requests(src)]
        for n in (1, 3, 7, 15, 40):
            fetch.set_swarm([f"peer{i}" for i in range(n)])
            got.append(fetch.scheduler.max_requests(src))
        return got

    assert trio.run(main) == [16, 8, 4, 2, 2, 2]
    store.close()


class LateClockSource(FlakySource):
    """Fails once with a short back-off; the clock then passes the back-off's end between the
    scheduler's readiness check and its deadline computation, as a loaded machine does."""

    def __init__(self, root: Path, clock: trio.testing.MockClock) -> None:
        super().__init__(root)
        self.clock = clock
        self.jumped = False

    def ready_at(self) -> float:
        t = self.score.ready_at
        if t > trio.current_time() and not self.jumped:
            self.jumped = True
            self.clock.jump(t - trio.current_time() + 0.01)  # the back-off is over by the next look
        return t

    async def fetch(self, request: FetchRequest, sink: PieceSink) -> None:
        self.starts.append(trio.current_time())
        if len(self.starts) == 1:
            self.score.ready_at = trio.current_time() + 0.05
            raise RetryLater("502", None)
        for p in request.pieces:
            data = (self.root / p.path).read_bytes()[p.offset : p.offset + p.length]
            await sink.put(p.index, data)


def test_backoff_ending_under_load_is_not_forgotten(published: Published, tmp_path: Path) -> None:
    """CI once hung 60 s here: the only mirror's back-off ended between two clock reads, so the
    loop found no future deadline and slept until a wake that never came."""
    clock = trio.testing.MockClock(rate=1.0)
    store = Store(tmp_path / "data")
    dl = store.open_download(published.signed, tmp_path / "out")
    src = LateClockSource(published.root, clock)

    async def main() -> None:
        with trio.fail_after(20):
            await Fetch(store, dl, [src], options=FetchOptions(check_space=False, progress_interval=1e9)).run()

    trio.run(main, clock=clock)
    store.close()
    published.assert_identical(tmp_path / "out")
    assert src.jumped and len(src.starts) >= 2
