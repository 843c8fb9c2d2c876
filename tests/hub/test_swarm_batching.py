"""The gateway's swarm holds: requests of one manifest are batched until they stop arriving (bounded).

The hold is a recording double of ``SwarmNode.hold`` (the real one runs in
tests/hub/test_gateway_swarm.py); time is trio's MockClock, so the windows are exact.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from autoglm.node._plan import FetchPlan
from autoglm.node.hub._api import HubFile, HubRef, RepoSnapshot
from autoglm.node.hub._swarm_flights import (
    ARM_FLEET,
    ARM_FLEET_MAX,
    ARM_WAIT,
    BATCH_MAX,
    BATCH_QUICK,
    BATCH_WINDOW,
    HubManifest,
    SwarmFlights,
)
from autoglm.protocol import FileEntry, Manifest, Piece, TrustPolicy, key_id, sign_manifest

REPO, COMMIT = "acme/batched", "3" * 40
PATHS = [f"f{i}.bin" for i in range(12)]


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def _setup(tmp: Path) -> tuple[HubManifest, RepoSnapshot, TrustPolicy]:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes_raw()
    sha = {p: hashlib.sha256(p.encode()).digest() for p in PATHS}  # different bytes: one flight per file
    entries = tuple(FileEntry(p, 4, sha[p], (Piece(0, 4, bytes(32)),)) for p in PATHS)
    signed = sign_manifest(Manifest(name=f"hf:{REPO}", version=COMMIT, created_at=1, publisher=key_id(pub), files=entries,
                                    max_piece_size=1 << 20), key)
    files = tuple(HubFile(p, 4, "0" * 40, sha[p].hex()) for p in PATHS)
    snap = RepoSnapshot(HubRef("hf", REPO, COMMIT), COMMIT, files, ("http://127.0.0.1:9",))
    return HubManifest(None, signed), snap, TrustPolicy(keys=frozenset({pub}))


async def _scenario(tmp: Path, gaps: list[float], heads: int = 0, foreign_heads: int = 0,
                    ) -> tuple[float, list[tuple[float, tuple[str, ...]]]]:
    """Requests for PATHS[0], PATHS[1], ... with ``gaps`` seconds between them; the holds started (the first runs on).

    ``heads``: first, HEAD requests for PATHS[:heads] (``hf_hub_download`` asks HEAD before GET);
    ``foreign_heads``: HEAD requests for files the manifest does not have (they go to the hub).
    """
    hm, snap, trust = _setup(tmp)
    holds: list[tuple[float, tuple[str, ...]]] = []

    async def hold(plan: FetchPlan, *, events: trio.MemorySendChannel[Any]) -> None:
        holds.append((trio.current_time(), plan.files))
        async with events:
            await trio.sleep_forever()  # a swarm fetch still running: the next batch waits for it

    async with trio.open_nursery() as nursery:
        sf = SwarmFlights([hm], hold, cache_dir=tmp, trust=trust, endpoints=snap.endpoints, token=None,
                          nursery=nursery, fall_back=lambda *a: None)
        for f in snap.files[:heads]:
            sf.expect(snap, f)
        for k in range(foreign_heads):
            sf.expect(snap, HubFile(f"not-in-manifest-{k}.md", 4, "1" * 40, None))
        t0 = trio.current_time()
        for i, gap in enumerate([0.0, *gaps]):
            await trio.sleep(gap)
            assert sf.take(snap, snap.files[i], tmp / "repo", hm) is not None
        await trio.sleep(BATCH_MAX + 1.0)
        nursery.cancel_scope.cancel()
    return t0, holds


async def test_requests_arriving_one_after_another_share_one_hold_until_they_stop(
        tmp_path: Path, clock: trio.testing.MockClock) -> None:
    # Four requests, each within the window of the one before (a busy client's 8 workers): one hold once they stop.
    gap = BATCH_WINDOW * 0.6
    t0, holds = await _scenario(tmp_path / "a", [gap] * 3)
    assert len(holds) == 1 and holds[0][0] == pytest.approx(t0 + 3 * gap + BATCH_WINDOW)
    assert set(holds[0][1]) == set(PATHS[:4])
    # Requests that never stop (twelve, one every 0.9 windows, over more than BATCH_MAX): the hold starts
    # BATCH_MAX after the first, with every file asked for by then; the rest wait for the next hold.
    gap = BATCH_WINDOW * 0.9
    t0, holds = await _scenario(tmp_path / "b", [gap] * 11)
    n = int(BATCH_MAX / gap) + 1
    assert n < len(PATHS) and len(holds) == 1
    assert holds[0][0] == pytest.approx(t0 + BATCH_MAX) and set(holds[0][1]) == set(PATHS[:n])


async def test_a_hold_starts_at_once_when_the_whole_manifest_was_asked_for(
        tmp_path: Path, clock: trio.testing.MockClock) -> None:
    # Every file, one every 0.1 s: nothing more can come, so the hold starts BATCH_QUICK after the last.
    gap = 0.1
    t0, holds = await _scenario(tmp_path / "a", [gap] * (len(PATHS) - 1))
    assert len(holds) == 1 and holds[0][0] == pytest.approx(t0 + (len(PATHS) - 1) * gap + BATCH_QUICK)
    assert set(holds[0][1]) == set(PATHS)


async def test_a_file_asked_head_for_is_waited_for_past_the_window(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    # HEADs for five files; four GETs, then the fifth 0.9 s later (three windows): still one hold, the window after it.
    gap = BATCH_WINDOW * 0.6
    late = BATCH_WINDOW * 3
    t0, holds = await _scenario(tmp_path / "a", [gap, gap, gap, late], heads=5)
    assert len(holds) == 1 and set(holds[0][1]) == set(PATHS[:5])
    assert holds[0][0] == pytest.approx(t0 + 3 * gap + late + BATCH_WINDOW)
    # The fifth GET never comes (the client had that file): the hold starts BATCH_MAX after the first request.
    t0, holds = await _scenario(tmp_path / "b", [gap] * 3, heads=5)
    assert len(holds) == 1 and set(holds[0][1]) == set(PATHS[:4])
    assert holds[0][0] == pytest.approx(t0 + BATCH_MAX)
    # HEADs for files outside the manifest (served by the hub, never a swarm GET): nothing waits for them.
    t0, holds = await _scenario(tmp_path / "c", [gap] * 3, foreign_heads=3)
    assert len(holds) == 1 and holds[0][0] == pytest.approx(t0 + 3 * gap + BATCH_WINDOW)


async def _armed(tmp: Path, asks: list[tuple[float, int]], fleet: Any = None,
                 ) -> tuple[float, list[tuple[float, tuple[str, ...], bool]], list[float]]:
    """A revision call arms the hold at t0; then GETs for PATHS[i] at (seconds after t0, i).

    Returns t0, the holds started (when, files, armed) and when each armed hold went on past ``before_start``.
    """
    hm, snap, trust = _setup(tmp)
    holds: list[tuple[float, tuple[str, ...], bool]] = []
    went: list[float] = []

    async def hold(plan: FetchPlan, *, events: trio.MemorySendChannel[Any], before_start: Any = None) -> None:
        holds.append((trio.current_time(), plan.files, before_start is not None))
        async with events:
            if before_start is not None:
                await before_start(b"m" * 32)  # what SwarmNode.hold does once the manifest is attached, before any request
                went.append(trio.current_time())
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        sf = SwarmFlights([hm], hold, cache_dir=tmp, trust=trust, endpoints=snap.endpoints, token=None,
                          nursery=nursery, fall_back=lambda *a: None, fleet=fleet)
        t0 = trio.current_time()
        sf.arm(snap)
        for at, i in asks:
            await trio.sleep_until(t0 + at)
            assert sf.take(snap, snap.files[i], tmp / "repo", hm) is not None
        await trio.sleep(ARM_WAIT + BATCH_MAX + 1.0)
        nursery.cancel_scope.cancel()
    return t0, holds, went


async def test_the_revision_call_starts_the_hold_of_the_whole_manifest_and_the_clients_requests_let_it_go_on(
        tmp_path: Path, clock: trio.testing.MockClock) -> None:
    # snapshot_download: the revision call, then (0.7 s later) a GET for every file. The hold of every file
    # started at the call (the node is a member of the swarm from then on) and goes on once the last GET is in.
    asks = [(0.7 + 0.01 * i, i) for i in range(len(PATHS))]
    t0, holds, went = await _armed(tmp_path / "a", asks)
    assert holds == [(t0, tuple(sorted(PATHS)), True)]
    assert went == [pytest.approx(t0 + asks[-1][0] + BATCH_QUICK)]


async def test_an_armed_hold_stands_down_for_a_client_that_asks_for_part_of_the_manifest_or_nothing(
        tmp_path: Path, clock: trio.testing.MockClock) -> None:
    # hf download --include: three files only. The armed hold (every file) never goes on; those three get
    # their own hold at once, so the node fetches nothing it was not asked for.
    asks = [(0.5, 0), (0.52, 1), (0.54, 2)]
    t0, holds, went = await _armed(tmp_path / "a", asks)
    assert went == [] and len(holds) == 2
    assert holds[0] == (t0, tuple(sorted(PATHS)), True)
    assert holds[1] == (pytest.approx(t0 + 0.54 + BATCH_WINDOW), tuple(PATHS[:3]), False)
    # No request at all (the client only asked for the model info): the armed hold ends ARM_WAIT later.
    t0, holds, went = await _armed(tmp_path / "b", [])
    assert went == [] and holds == [(t0, tuple(sorted(PATHS)), True)]


async def test_an_armed_hold_waits_for_the_peers_in_session_to_arm_theirs_within_a_bound(
        tmp_path: Path, clock: trio.testing.MockClock) -> None:
    asks = [(0.3 + 0.01 * i, i) for i in range(len(PATHS))]
    # Two of the three peers fetch the manifest from the start, the third arms 1.2 s after our revision call.
    t0 = trio.current_time()
    t0, holds, went = await _armed(tmp_path / "a", asks,
                                   fleet=lambda mid: (2 + (trio.current_time() >= t0 + 1.2), 2 + (trio.current_time() >= t0 + 1.2), 3))
    assert len(holds) == 1 and went[0] == pytest.approx(t0 + 1.2, abs=0.06)
    # Nobody else fetches it (one peer is a seed holding all of it, one never fetches): ARM_FLEET after the call.
    t0, holds, went = await _armed(tmp_path / "b", asks, fleet=lambda mid: (0, 1, 2))
    assert went == [pytest.approx(t0 + ARM_FLEET, abs=0.06)]
    # Another peer fetches it too (a fleet is starting) but the third never does: ARM_FLEET_MAX after the call.
    t0, holds, went = await _armed(tmp_path / "c", asks, fleet=lambda mid: (1, 2, 3))
    assert went == [pytest.approx(t0 + ARM_FLEET_MAX, abs=0.06)]
    # Every peer already holds it: no wait past the batch.
    t0, holds, went = await _armed(tmp_path / "d", asks, fleet=lambda mid: (3, 3, 3))
    assert went == [pytest.approx(t0 + asks[-1][0] + BATCH_QUICK)]
