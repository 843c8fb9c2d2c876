"""Staged roll-out in signed name records (record v2): signed, bounded, v1-compatible, deterministic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoglm.protocol import (
    LocalProtocolError,
    RemoteProtocolError,
    SignatureError,
    decode_canonical,
    encode_canonical,
    generate_private_key,
)
from autoglm.protocol._namerecord import (
    ROLLOUT_FULL,
    NameRecord,
    check_name_update,
    decode_name_record,
    rollout_admits,
    select_name_record,
    sign_name_record,
    verify_name_record,
)

KEY = generate_private_key()
OTHER = generate_private_key()
M1, M2 = b"\x01" * 32, b"\x02" * 32


def test_full_rollout_is_still_a_v1_record() -> None:
    """Without a share the record is byte-for-byte what v1 nodes write and read."""
    rec = sign_name_record(KEY, "m", M1, "1", 3)
    assert decode_canonical(rec.encode())["v"] == 1
    assert "rollout" not in decode_canonical(rec.encode())
    assert verify_name_record(rec.key, rec.encode()).rollout == ROLLOUT_FULL


def test_staged_record_roundtrips_as_v2() -> None:
    rec = sign_name_record(KEY, "m", M2, "2", 4, rollout=100_000)
    value = decode_canonical(rec.encode())
    assert value["v"] == 2 and value["rollout"] == 100_000
    assert verify_name_record(rec.key, rec.encode()) == rec


def test_share_is_covered_by_the_signature() -> None:
    """A relay that widens 10 % to 100 % (or narrows it) breaks the signature."""
    rec = sign_name_record(KEY, "m", M2, "2", 4, rollout=100_000)
    for share in (999_999, 1):
        forged = NameRecord(rec.public_key, rec.name, rec.manifest_id, rec.version, rec.seq, rec.signature, share)
        with pytest.raises(SignatureError):
            verify_name_record(rec.key, forged.encode())
    # Dropping the field (turning it into a v1 record for everyone) breaks it too.
    full = NameRecord(rec.public_key, rec.name, rec.manifest_id, rec.version, rec.seq, rec.signature)
    with pytest.raises(SignatureError):
        verify_name_record(rec.key, full.encode())


@pytest.mark.parametrize("bad", [0, ROLLOUT_FULL, ROLLOUT_FULL + 1, -5, True, "10", None])
def test_malformed_share_refused(bad: object) -> None:
    rec = sign_name_record(KEY, "m", M2, "2", 4, rollout=100_000)
    value = {**decode_canonical(rec.encode()), "rollout": bad}
    with pytest.raises(RemoteProtocolError):
        decode_name_record(encode_canonical(value))


def test_v1_record_with_a_share_field_refused_and_unknown_version_refused() -> None:
    rec = sign_name_record(KEY, "m", M1, "1", 3)
    value = decode_canonical(rec.encode())
    with pytest.raises(RemoteProtocolError):
        decode_name_record(encode_canonical({**value, "rollout": 10}))
    with pytest.raises(RemoteProtocolError, match="version"):
        decode_name_record(encode_canonical({**value, "v": 3}))


def test_sign_refuses_bad_share() -> None:
    for bad in (0, ROLLOUT_FULL + 1):
        with pytest.raises(LocalProtocolError):
            sign_name_record(KEY, "m", M1, "1", 3, rollout=bad)


def test_malicious_records_refused_with_a_share() -> None:
    """Another publisher's staged record under my key, and a lower seq, are refused as for v1."""
    mine = sign_name_record(KEY, "m", M1, "1", 5)
    theirs = sign_name_record(OTHER, "m", M2, "2", 9, rollout=500_000)
    with pytest.raises(SignatureError):
        verify_name_record(mine.key, theirs.encode())
    older = sign_name_record(KEY, "m", M2, "2", 4, rollout=500_000)
    with pytest.raises(RemoteProtocolError, match="supersede"):
        check_name_update(mine.key, mine.encode(), older.encode())
    assert select_name_record(mine.key, [theirs.encode(), older.encode(), mine.encode()]) == 2


def test_republishing_the_old_manifest_with_a_higher_seq_wins() -> None:
    """Roll-back: v1's manifest again, seq above v2's staged record."""
    v1 = sign_name_record(KEY, "m", M1, "1", 5)
    v2 = sign_name_record(KEY, "m", M2, "2", 6, rollout=100_000)
    back = sign_name_record(KEY, "m", M1, "1", 7)
    assert check_name_update(v1.key, v2.encode(), back.encode()).manifest_id == M1
    assert select_name_record(v1.key, [v1.encode(), v2.encode(), back.encode()]) == 2


PEERS = [f"12D3KooW{i:040d}" for i in range(4000)]


@pytest.mark.parametrize("share", [10_000, 100_000, 500_000, 900_000])
def test_share_of_admitted_followers_matches(share: int) -> None:
    admitted = sum(rollout_admits(p, M2, share) for p in PEERS)
    expected = len(PEERS) * share / ROLLOUT_FULL
    assert abs(admitted - expected) < 4 * (expected * (1 - share / ROLLOUT_FULL)) ** 0.5 + 1


def test_full_share_admits_everyone_and_each_manifest_picks_its_own_followers() -> None:
    assert all(rollout_admits(p, M2, ROLLOUT_FULL) for p in PEERS[:100])
    first = {p for p in PEERS if rollout_admits(p, M1, 100_000)}
    other = {p for p in PEERS if rollout_admits(p, M2, 100_000)}
    assert first != other


@given(st.text(min_size=1, max_size=60), st.binary(min_size=32, max_size=32),
       st.integers(1, ROLLOUT_FULL), st.integers(1, ROLLOUT_FULL))
def test_raising_the_share_never_drops_a_follower(peer: str, mid: bytes, a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    if rollout_admits(peer, mid, lo):
        assert rollout_admits(peer, mid, hi)
    assert rollout_admits(peer, mid, lo) == rollout_admits(peer, mid, lo)  # deterministic
