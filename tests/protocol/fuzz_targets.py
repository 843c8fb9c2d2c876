"""One entry point per protocol decoder, shared by bench/fuzz.py (atheris) and the regression replay.

Each target takes arbitrary bytes and must either parse them or raise one of
the errors its decoder documents (RemoteProtocolError, and for signed objects
SignatureError/TrustError). Anything else escaping a target is a bug, and the
input that caused it is kept in tests/protocol/fuzz_crashes/<target>/.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from autoglm.protocol import (
    FileEntry,
    Manifest,
    Piece,
    RemoteProtocolError,
    SignatureError,
    TrustError,
    TrustPolicy,
    Variant,
    decode_canonical,
    decode_manifest,
    decode_signed_manifest,
    encode_canonical,
    key_id,
    sign_manifest,
    verify_manifest,
)
from autoglm.protocol._bitfield import Bitfield
from autoglm.protocol._codec import Limits, decode_frame_payload
from autoglm.protocol._control import (
    ControlConnection,
    Endpoint,
    Hello,
    ManifestState,
    decode_control,
    encode_control,
)
from autoglm.protocol._frames import NEED_DATA, FrameDecoder, encode_frame
from autoglm.protocol._namerecord import decode_name_record, sign_name_record, verify_name_record
from autoglm.protocol._peerwire import PeerwireClient, PeerwireServer, Welcome
from autoglm.protocol._x509 import verify_publisher_chain

KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz").digest())
PUB = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
H = hashlib.sha256(b"h").digest()
MANIFEST = Manifest(
    "fuzz/model", "2.0", 7, key_id(PUB),
    (FileEntry("a/b.safetensors", 5, H, (Piece(0, 4, H), Piece(4, 1, H))), FileEntry("c.json", 0, H, ())),
    (Variant("v", ("c.json",)),), H, 4,
)
ENVELOPE = sign_manifest(MANIFEST, KEY).encode()
RECORD = sign_name_record(KEY, "fuzz/model", H, "2.0", 3)
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
EXPECTED = (RemoteProtocolError, SignatureError, TrustError)


def _codec(data: bytes) -> None:
    decode_canonical(data)
    decode_frame_payload(data, Limits(max_bytes=4096, max_str_len=256, max_bin_len=64, max_array_len=8, max_map_len=4))


def _manifest(data: bytes) -> None:
    decode_manifest(data)


def _envelope(data: bytes) -> None:
    signed = decode_signed_manifest(data)
    verify_manifest(signed, TrustPolicy(keys=frozenset({PUB}), roots=(b"-",)), NOW)


def _control(data: bytes) -> None:
    """One payload as a message, then the bytes as a whole stream into a connection."""
    try:
        decode_control(data)
    except RemoteProtocolError:
        pass
    conn = ControlConnection(0.0)
    conn.receive_data(data, 0.0)
    conn.receive_data(b"", 0.0)
    for _ in range(10_000):
        if conn.next_event() is NEED_DATA:
            return


def _peerwire_server(data: bytes) -> None:
    srv = PeerwireServer()
    srv.receive_data(data)
    for _ in range(10_000):
        ev = srv.next_event()
        if ev is NEED_DATA:
            return
        if type(ev).__name__ == "Auth":
            srv.accept()


def _peerwire_client(data: bytes) -> None:
    """A client with requests in flight reading whatever a server sends (pieces, zstd, rejects)."""
    cli = PeerwireClient()
    cli.auth(b"k" * 32)
    for i in range(1, 5):
        cli.request(i, b"m" * 32, i, 1 << i * 4)
    cli.receive_data(data)
    cli.receive_data(b"")
    for _ in range(10_000):
        try:
            ev = cli.next_event()
        except RemoteProtocolError:
            return
        if ev is NEED_DATA:
            return
        assert isinstance(ev, Welcome) or ev is not None


def _frames(data: bytes) -> None:
    dec = FrameDecoder(256)
    half = len(data) // 2
    for part in (data[:half], data[half:]):  # b"" marks the end: fed once, last
        if part:
            dec.receive_data(part)
    dec.receive_data(b"")
    for _ in range(10_000):
        if dec.next_frame() is NEED_DATA:
            return


def _bitfield(data: bytes) -> None:
    if len(data) < 2:
        return
    size = int.from_bytes(data[:2], "big")
    bf = Bitfield.from_bytes(data[2:], size)
    assert len(bf) <= size and bf.to_bytes() == data[2:]


def _namerecord(data: bytes) -> None:
    try:
        decode_name_record(data)
    except EXPECTED:
        pass
    verify_name_record(RECORD.key, data)


def _x509(data: bytes) -> None:
    cut = len(data) // 2
    verify_publisher_chain((data[:cut], data[cut:]) if cut else (data,), PUB,
                           TrustPolicy(roots=(data,), spiffe_ids=("spiffe://a.example/",)), NOW)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "codec": _codec,
    "manifest": _manifest,
    "envelope": _envelope,
    "control": _control,
    "peerwire_server": _peerwire_server,
    "peerwire_client": _peerwire_client,
    "frames": _frames,
    "bitfield": _bitfield,
    "namerecord": _namerecord,
    "x509": _x509,
}


def seeds(target: str) -> list[bytes]:
    """Valid inputs to start from (coverage-guided fuzzing mutates these)."""
    hello = Hello((ManifestState(H, 9, Bitfield(9, [1, 8]).to_bytes()),), Endpoint("127.0.0.1", 7000), b"t" * 32)
    srv = PeerwireServer()
    cli = PeerwireClient()
    up = cli.auth(b"k" * 32) + cli.request(1, b"m" * 32, 1, 16)
    srv.receive_data(up)
    srv.next_event()
    down = srv.accept() + srv.piece_header(1, 0, 16) + b"x" * 16  # type: ignore[arg-type]
    return {
        "codec": [encode_canonical({"a": [1, b"x", "y", True, None, -5]}), encode_canonical([[1, 2], {"k": 3}])],
        "manifest": [MANIFEST.encode()],
        "envelope": [ENVELOPE],
        "control": [encode_control(hello), encode_frame(encode_control(hello), 1 << 22)],
        "peerwire_server": [up],
        "peerwire_client": [down],
        "frames": [encode_frame(b"abc", 256) * 3],
        "bitfield": [b"\x00\x09" + Bitfield(9, [0, 3, 8]).to_bytes()],
        "namerecord": [RECORD.encode()],
        "x509": [b"0\x82\x01\x00" + b"\x00" * 64],
    }[target]
