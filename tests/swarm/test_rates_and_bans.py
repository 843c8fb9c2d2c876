"""Have/Claim rate budgets per peer and timed bans for broken promises (issue 11, "Budgets per peer").

A peer that sends Have or Claim messages beyond its token bucket loses its
session; a peer that advertised pieces, was asked for them and refused or
stalled ``broken_promises`` times within the window is banned for that
manifest for ``promise_ban`` seconds (then offered again). Pure parts are
table tests; the swarm's part runs the real Swarm over trio memory streams.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from autoglm.node._store import Store
from autoglm.node.swarm import PeerBudget, Swarm, SwarmConfig
from autoglm.node.swarm.budget import PromiseLedger, TokenBucket
from autoglm.protocol._bitfield import Bitfield
from autoglm.protocol._control import (
    Claim,
    ControlConnection,
    Have,
    Hello,
    Interested,
    ManifestState,
    NotInterested,
    TokenRequest,
    encode_control,
)

from .test_budgets import _drain, _settled
from .test_swarm_unit import MemControlStream, RecordingFetch

MID = b"\x2a" * 32
PIECES = 64


# -- pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "burst", "takes", "expect"),
    [
        (1.0, 3, [0.0, 0.0, 0.0, 0.0], [True, True, True, False]),  # the burst, then empty
        (1.0, 3, [0.0, 0.0, 0.0, 0.0, 1.0], [True, True, True, False, True]),  # refills at rate
        (2.0, 1, [0.0, 0.2, 0.5, 0.9, 1.0], [True, False, True, False, True]),
        (1.0, 2, [0.0, 100.0, 100.0, 100.0], [True, True, True, False]),  # saves no more than the burst
    ],
)
def test_token_bucket(rate: float, burst: int, takes: list[float], expect: list[bool]) -> None:
    b = TokenBucket(rate, burst, 0.0)
    assert [b.take(t) for t in takes] == expect


def test_promise_ledger_counts_within_the_window() -> None:
    led = PromiseLedger(limit=3, window=60.0)
    assert not led.broken("p", MID, 0.0)
    assert not led.broken("p", MID, 30.0)
    assert not led.broken("q", MID, 31.0)  # per peer
    assert not led.broken("p", b"\x01" * 32, 32.0)  # and per manifest
    assert not led.broken("p", MID, 61.0)  # the one at 0 has left the window
    assert led.broken("p", MID, 62.0)  # 30, 61, 62: three within 60 s
    assert led.count("p", MID, 62.0) == 0  # the count restarts after a ban


def test_promise_ledger_is_bounded() -> None:
    led = PromiseLedger(limit=5, window=60.0, max_keys=100)
    for k in range(10_000):
        led.broken(f"p{k}", MID, float(k) / 1000)
    assert len(led) <= 100


# -- the swarm: rates ----------------------------------------------------------------------


async def _flood(tmp_path: Path, budget: PeerBudget, frames: list[object]) -> tuple[Swarm, list[object]]:
    swarm = Swarm(None, Store(tmp_path), SwarmConfig(budget=budget))  # type: ignore[arg-type]
    swarm.start_holding(MID, PIECES)
    swarm.attach(MID, RecordingFetch())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            swarm.use_nursery(nursery)
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(swarm.serve_session, MemControlStream(a, "peerB"))
            theirs, conn = MemControlStream(b, "peerSelf"), ControlConnection(trio.current_time())
            state = ManifestState(MID, PIECES, Bitfield(PIECES, ()).to_bytes())
            data = conn.send(Hello((state,), None, b"t" * 16), 0.0)
            data += b"".join(encode_control(f) for f in frames)  # type: ignore[arg-type]  # (no local checks)
            await theirs.send_all(data)
            got: list[object] = []
            with trio.move_on_after(2.0):
                got = await _drain(conn, theirs)
            await _settled()
            nursery.cancel_scope.cancel()
    return swarm, got


@pytest.mark.parametrize(
    ("budget", "frames", "dropped"),
    [
        # Haves beyond the burst: the session ends
        (PeerBudget(haves_per_second=10, have_burst=500), [Have(MID, k % PIECES) for k in range(2000)], True),
        # within the burst: the session stays
        (PeerBudget(haves_per_second=10, have_burst=500), [Have(MID, k % PIECES) for k in range(400)], False),
        # the default budget takes a fast honest peer's Haves (every piece, twice)
        (PeerBudget(), [Have(MID, k % PIECES) for k in range(2 * PIECES)], False),
        (PeerBudget(claims_per_second=1, claim_burst=50), [Claim(MID, (k % PIECES,)) for k in range(200)], True),
        (PeerBudget(claims_per_second=1, claim_burst=50), [Claim(MID, (k % PIECES,)) for k in range(40)], False),
        (PeerBudget(), [TokenRequest() for _ in range(2000)], True),
        (PeerBudget(), [TokenRequest() for _ in range(8)], False),
        (PeerBudget(), [Interested(MID) if k % 2 else NotInterested(MID) for k in range(5000)], True),
        (PeerBudget(), [Interested(MID), NotInterested(MID)] * 8, False),
    ],
)
async def test_have_and_claim_rates(tmp_path: Path, budget: PeerBudget, frames: list[object], dropped: bool) -> None:
    swarm, _ = await _flood(tmp_path, budget, frames)
    assert (swarm.stats.over_budget == 1) is dropped


# -- the swarm: timed bans for broken promises -------------------------------------------------


async def test_broken_promises_ban_for_a_stated_time(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    budget = PeerBudget(broken_promises=3, broken_promise_window=60.0, promise_ban=900.0)
    # The session outlives the ban (this test's peer sends no keepalives).
    cfg = SwarmConfig(budget=budget, idle_timeout=5000.0, keepalive_interval=2500.0)
    swarm = Swarm(None, Store(tmp_path), cfg)  # type: ignore[arg-type]
    swarm.start_holding(MID, PIECES)
    fetch = RecordingFetch()
    swarm.attach(MID, fetch)
    async with trio.open_nursery() as nursery:
        swarm.use_nursery(nursery)
        a, b = trio.testing.memory_stream_pair()
        nursery.start_soon(swarm.serve_session, MemControlStream(a, "peerB"))
        theirs, conn = MemControlStream(b, "peerSelf"), ControlConnection(trio.current_time())
        state = ManifestState(MID, PIECES, Bitfield(PIECES, range(PIECES)).to_bytes())
        await theirs.send_all(conn.send(Hello((state,), None, b"t" * 16), trio.current_time()))
        await trio.testing.wait_all_tasks_blocked()
        assert fetch.swarms[-1] | fetch.complete[-1] == {"peerB"}
        t0 = trio.current_time()
        swarm.broken_promise("peerB", MID, "refused piece 1")
        await trio.sleep(30)
        swarm.broken_promise("peerB", MID, "stalled on piece 2")
        assert not swarm.is_banned("peerB", MID)  # two: not yet a lie told repeatedly
        await trio.sleep(10)
        swarm.broken_promise("peerB", MID, "refused piece 3")
        assert swarm.is_banned("peerB", MID)
        assert fetch.swarms[-1] | fetch.complete[-1] == set()  # no member while banned
        assert [b[0] for b in swarm.stats.banned] == ["peerB"]
        assert swarm.stats.bad_pieces == 0  # a ban for lies, not for a bad piece
        await trio.sleep_until(t0 + 40 + 900 - 1)
        assert swarm.is_banned("peerB", MID)
        await trio.sleep(2)
        assert not swarm.is_banned("peerB", MID)  # served its time: a member again
        await trio.testing.wait_all_tasks_blocked()
        assert fetch.swarms[-1] | fetch.complete[-1] == {"peerB"}
        nursery.cancel_scope.cancel()


async def test_a_hash_failure_ban_outlasts_a_timed_one(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    swarm = Swarm(None, Store(tmp_path), SwarmConfig(budget=PeerBudget(broken_promises=1, promise_ban=10.0)))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        swarm.use_nursery(nursery)
        swarm.broken_promise("peerB", MID, "refused piece 1")
        swarm.ban("peerB", MID, "piece 2 failed its hash")
        await trio.sleep(3600)
        assert swarm.is_banned("peerB", MID)
        nursery.cancel_scope.cancel()
