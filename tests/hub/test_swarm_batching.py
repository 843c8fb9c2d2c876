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
    sha = hashlib.sha256(b"data").digest()
    entries = tuple(FileEntry(p, 4, sha, (Piece(0, 4, bytes(32)),)) for p in PATHS)
    signed = sign_manifest(Manifest(name=f"hf:{REPO}", version=COMMIT, created_at=1, publisher=key_id(pub), files=entries,
                                    max_piece_size=1 << 20), key)
    files = tuple(HubFile(p, 4, "0" * 40, sha.hex()) for p in PATHS)
    snap = RepoSnapshot(HubRef("hf", REPO, COMMIT), COMMIT, files, ("http://127.0.0.1:9",))
    return HubManifest(None, signed), snap, TrustPolicy(keys=frozenset({pub}))


async def _scenario(tmp: Path, gaps: list[float], heads: int = 0) -> tuple[float, list[tuple[float, tuple[str, ...]]]]:
    """Requests for PATHS[0], PATHS[1], ... with ``gaps`` seconds between them; the holds started (the first runs on).

    ``heads``: first, HEAD requests for PATHS[:heads] (``hf_hub_download`` asks HEAD before GET).
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
