"""The control protocol's one table of messages: {code: (class, fields)}."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from autoglm.protocol._codec import encode_frame_payload
from autoglm.protocol._control import (
    MESSAGES,
    TRANSITIONS,
    Close,
    ControlMessage,
    Have,
    decode_control,
    encode_control,
)
from autoglm.protocol._errors import RemoteProtocolError
from autoglm.protocol._frames import FrameDecoder

ALL = typing.get_args(ControlMessage)


def test_every_message_class_has_exactly_one_code() -> None:
    classes = [cls for cls, _ in MESSAGES.values()]
    assert sorted(classes, key=lambda c: c.__name__) == sorted(ALL, key=lambda c: c.__name__)
    assert len(set(classes)) == len(classes)


def test_codes_are_the_published_numbers() -> None:
    # docs/protocol.md and tests/vectors/swarm-v1.json: never renumber.
    assert {code: cls.__name__ for code, (cls, _) in MESSAGES.items()} == {
        1: "Hello", 2: "Announce", 3: "Have", 4: "Interested", 5: "NotInterested", 6: "Choke", 7: "Unchoke",
        8: "Keepalive", 9: "TokenRequest", 10: "Token", 11: "Close", 12: "GetManifest", 13: "ManifestData",
        14: "Peers", 15: "Claim", 16: "KeyProof",
    }


@pytest.mark.parametrize("code", sorted(MESSAGES))
def test_fields_are_the_dataclass_fields(code: int) -> None:
    cls, fields = MESSAGES[code]
    assert {f.name for f in fields} == {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("code", sorted(MESSAGES))
def test_every_message_can_be_sent_in_some_phase(code: int) -> None:
    cls, _ = MESSAGES[code]
    assert any(t is cls for _, t in TRANSITIONS)


def _payload(frame: bytes) -> bytes:
    dec = FrameDecoder(1 << 20)
    dec.receive_data(frame)
    out = dec.next_frame()
    assert isinstance(out, bytes)
    return out


@pytest.mark.parametrize("code", [0, 17, 99, -1, 2**31])
def test_an_unknown_code_is_a_remote_error_never_close(code: int) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown control message type"):
        decode_control(encode_frame_payload([code, "bye"]))


@pytest.mark.parametrize("code", [True, "11", None, b"\x0b"])
def test_a_code_that_is_not_an_integer_is_a_remote_error(code: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_control(encode_frame_payload([code, "bye"]))


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ([11], "has 0 fields, not 1"),
        ([11, "a", "b"], "has 2 fields, not 1"),
        ([6, 1], "has 1 fields, not 0"),
        ([3, b"\x01" * 32], "has 1 fields, not 2"),
        ([11, 5], "close reason"),
    ],
)
def test_field_count_and_types_from_the_table(value: list[object], why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        decode_control(encode_frame_payload(value))


def test_close_and_have_round_trip_through_the_table() -> None:
    for msg in (Close("done"), Have(b"\x02" * 32, 7)):
        assert decode_control(_payload(encode_control(msg))) == msg
