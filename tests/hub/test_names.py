"""The gateway's name-record lookups (node/hub/_names.py): bounded waits, the TTL, what a record may cover.

The name source is an in-memory table of real signed records and manifests
(the node's DHT and peers are the integration test's, tests/hub/test_gateway_swarm.py);
time is trio's MockClock, so the bounds are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from autoglm.node.errors import NoSourceError
from autoglm.node.hub._names import NameCovers
from autoglm.protocol import (
    FileEntry,
    Manifest,
    Piece,
    SignedManifest,
    TrustPolicy,
    key_id,
    sign_manifest,
)
from autoglm.protocol._namerecord import NameRecord, sign_name_record

REPO = "acme/named"
C1, C2 = "1" * 40, "2" * 40


def _signed(key: Ed25519PrivateKey, name: str, version: str) -> SignedManifest:
    pub = key.public_key().public_bytes_raw()
    f = FileEntry("w.bin", 4, bytes(32), (Piece(0, 4, bytes(32)),))
    return sign_manifest(Manifest(name=name, version=version, created_at=1, publisher=key_id(pub), files=(f,),
                                  max_piece_size=1 << 20), key)


@dataclass
class Table:
    """Records by name and manifests by id; ``delay`` before every answer, ``hang`` never answers."""

    records: dict[str, NameRecord] = field(default_factory=dict)
    manifests: dict[bytes, SignedManifest] = field(default_factory=dict)
    delay: float = 0.0
    hang: bool = False
    asked: int = 0

    def put(self, key: Ed25519PrivateKey, signed: SignedManifest, seq: int) -> None:
        m = signed.manifest
        self.records[m.name] = sign_name_record(key, m.name, signed.id, m.version, seq)
        self.manifests[signed.id] = signed

    async def resolve_record(self, name: str, trust: TrustPolicy) -> NameRecord:
        self.asked += 1
        await trio.sleep(self.delay)
        if self.hang:
            await trio.sleep_forever()
        rec = self.records.get(name)
        if rec is None or rec.public_key not in trust.keys:
            raise NoSourceError(f"no name record for {name!r} by a trusted publisher key")
        return rec

    async def manifest_for(self, rec: NameRecord) -> SignedManifest:
        await trio.sleep(self.delay)
        return self.manifests[rec.manifest_id]


def _trust(*keys: Ed25519PrivateKey) -> TrustPolicy:
    return TrustPolicy(keys=frozenset(k.public_key().public_bytes_raw() for k in keys))


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_record_covers_its_commit_only_and_is_cached_for_the_ttl(clock: trio.testing.MockClock) -> None:
    key = Ed25519PrivateKey.generate()
    table = Table(delay=1.0)
    one = _signed(key, f"hf:{REPO}", C1)
    table.put(key, one, 1)
    async with trio.open_nursery() as nursery:
        covers = NameCovers(table, _trust(key), nursery, ttl=30.0, wait=5.0, timeout=30.0)
        t0 = trio.current_time()
        assert await covers.covering(REPO, C1) == one
        assert trio.current_time() - t0 == pytest.approx(2.0)  # record, then manifest
        assert await covers.covering(REPO, C2) is None  # the record names C1: C2 goes to the hub
        assert table.asked == 1 and trio.current_time() - t0 == pytest.approx(2.0)  # cached: no second lookup
        # The publisher moves the name to C2: seen once the TTL is over; C1's manifest still covers C1.
        two = _signed(key, f"hf:{REPO}", C2)
        table.put(key, two, 2)
        await trio.sleep(30.5)
        assert await covers.covering(REPO, C2) == two
        assert table.asked == 2
        assert await covers.covering(REPO, C1) == one
        nursery.cancel_scope.cancel()


async def test_a_hanging_lookup_delays_a_flight_by_the_wait_bound_only(clock: trio.testing.MockClock) -> None:
    key = Ed25519PrivateKey.generate()
    table = Table(hang=True)
    async with trio.open_nursery() as nursery:
        covers = NameCovers(table, _trust(key), nursery, ttl=30.0, wait=3.0, timeout=20.0)
        covers.look_ahead(REPO)  # started when the revision resolved
        await trio.sleep(1.0)
        t0 = trio.current_time()
        assert await covers.covering(REPO, C1) is None
        assert trio.current_time() - t0 == pytest.approx(3.0)
        # Given up after the timeout; the "none" is cached: the next flights do not wait at all.
        await trio.sleep(17.0)
        t1 = trio.current_time()
        assert await covers.covering(REPO, C1) is None
        assert trio.current_time() == t1 and table.asked == 1
        nursery.cancel_scope.cancel()


async def test_untrusted_or_misnamed_manifests_cover_nothing(clock: trio.testing.MockClock) -> None:
    trusted, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    table = Table()
    # A trusted record pointing at a manifest of another name (another repository's) covers nothing.
    table.put(trusted, _signed(trusted, "hf:acme/else", C1), 1)
    table.records[f"hf:{REPO}"] = table.records.pop("hf:acme/else")
    # A record by a key the node does not trust is never used.
    table.put(other, _signed(other, "hf:acme/untrusted", C1), 1)
    async with trio.open_nursery() as nursery:
        covers = NameCovers(table, _trust(trusted), nursery, ttl=30.0, wait=3.0, timeout=20.0)
        assert await covers.covering(REPO, C1) is None
        assert await covers.covering("acme/untrusted", C1) is None
        assert await covers.covering("acme/missing", C1) is None
        nursery.cancel_scope.cancel()
