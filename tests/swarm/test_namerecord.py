"""Signed name records: sign, verify, refuse bad signatures and lower sequence numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoglm.protocol import (
    RemoteProtocolError,
    SignatureError,
    encode_canonical,
    generate_private_key,
)
from autoglm.protocol._namerecord import (
    check_name_update,
    decode_name_record,
    select_name_record,
    sign_name_record,
    verify_name_record,
)

KEY = generate_private_key()
OTHER = generate_private_key()
M1, M2 = b"\x01" * 32, b"\x02" * 32


def test_roundtrip_and_key() -> None:
    rec = sign_name_record(KEY, "org/model", M1, "1.0", 1)
    assert rec.key == f"/agname/{rec.publisher}/org/model"
    assert verify_name_record(rec.key, rec.encode()) == rec


def test_bad_signature_refused() -> None:
    rec = sign_name_record(KEY, "m", M1, "1.0", 1)
    forged = type(rec)(rec.public_key, rec.name, M2, rec.version, rec.seq, rec.signature)
    with pytest.raises(SignatureError):
        verify_name_record(rec.key, forged.encode())


def test_other_publishers_record_under_my_key_refused() -> None:
    mine = sign_name_record(KEY, "m", M1, "1.0", 1)
    theirs = sign_name_record(OTHER, "m", M2, "1.0", 9)
    with pytest.raises(SignatureError):
        verify_name_record(mine.key, theirs.encode())


def test_unsigned_refused() -> None:
    rec = sign_name_record(KEY, "m", M1, "1.0", 1)
    value = {"v": 1, "key": rec.public_key, "name": "m", "manifest": M1, "version": "1.0", "seq": 1}
    with pytest.raises(SignatureError, match="unsigned"):
        verify_name_record(rec.key, encode_canonical(value))


def test_lower_sequence_refused_higher_accepted() -> None:
    r1 = sign_name_record(KEY, "m", M1, "1.0", 5)
    r0 = sign_name_record(KEY, "m", M2, "0.9", 4)
    r2 = sign_name_record(KEY, "m", M2, "1.1", 6)
    with pytest.raises(RemoteProtocolError, match="supersede"):
        check_name_update(r1.key, r1.encode(), r0.encode())
    assert check_name_update(r1.key, r1.encode(), r2.encode()) == r2
    assert check_name_update(r1.key, r1.encode(), r1.encode()) == r1
    same_seq = sign_name_record(KEY, "m", M2, "1.0b", 5)
    with pytest.raises(RemoteProtocolError):
        check_name_update(r1.key, r1.encode(), same_seq.encode())
    assert select_name_record(r1.key, [r0.encode(), b"junk", r2.encode(), r1.encode()]) == 2


@given(st.binary(max_size=400))
def test_fuzz_decode(data: bytes) -> None:
    try:
        decode_name_record(data)
    except (RemoteProtocolError, SignatureError):
        pass
