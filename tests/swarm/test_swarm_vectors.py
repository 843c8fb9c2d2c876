"""Golden vectors for the swarm wire formats (tests/vectors/swarm-v1.json).

The bytes must never change: a change is a new protocol version.
"""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from autoglm.protocol._bitfield import Bitfield
from autoglm.protocol._control import (
    Announce,
    Choke,
    Claim,
    Close,
    ControlMessage,
    Endpoint,
    GetManifest,
    Have,
    Hello,
    Interested,
    Keepalive,
    ManifestData,
    ManifestState,
    NotInterested,
    PeerInfo,
    Peers,
    Token,
    TokenRequest,
    Unchoke,
    decode_control,
    encode_control,
)
from autoglm.protocol._frames import NEED_DATA
from autoglm.protocol._namerecord import sign_name_record, verify_name_record
from autoglm.protocol._peerwire import (
    Auth,
    Codec,
    PeerwireClient,
    PeerwireServer,
    RejectReason,
    Request,
)

from .conftest_paths import VECTORS

V = json.loads((VECTORS / "swarm-v1.json").read_text())
MID = bytes(range(32))
CONTROL: dict[str, ControlMessage] = {
    "hello": Hello((ManifestState(MID, 10, Bitfield(10, [0, 3, 9]).to_bytes()),), Endpoint("127.0.0.1", 7001), b"\xaa" * 16),
    "announce": Announce(ManifestState(MID, 3, b"\x00")),
    "have": Have(MID, 9),
    "interested": Interested(MID),
    "not_interested": NotInterested(MID),
    "choke": Choke(),
    "unchoke": Unchoke(),
    "keepalive": Keepalive(),
    "token_request": TokenRequest(),
    "token": Token(b"\xbb" * 16),
    "get_manifest": GetManifest(MID),
    "manifest_data": ManifestData(MID, b"envelope"),
    "peers": Peers(MID, (PeerInfo("12D3KooWA", ("/ip4/127.0.0.1/tcp/4001",)),)),
    "claim": Claim(MID, (1, 9)),
    "close": Close("bye"),
}


@pytest.mark.parametrize("name", sorted(CONTROL))
def test_control_vectors(name: str) -> None:
    wire = bytes.fromhex(V["control"][name])
    assert encode_control(CONTROL[name]) == wire
    assert decode_control(wire[4:]) == CONTROL[name]


def test_peerwire_vectors() -> None:
    pw = {k: bytes.fromhex(v) for k, v in V["peerwire"].items()}
    cli = PeerwireClient()
    assert cli.auth(b"\xaa" * 16) == pw["auth"]
    assert cli.request(1, MID, 9, 100, True) == pw["request"]
    assert cli.cancel(1) == pw["cancel"]
    srv = PeerwireServer()
    srv.receive_data(pw["auth"] + b"")
    assert srv.next_event() == Auth(b"\xaa" * 16)
    assert srv.accept() == pw["welcome"]
    srv.receive_data(pw["request"])
    assert srv.next_event() == Request(1, MID, 9, True)
    assert srv.next_event() is NEED_DATA
    assert srv.piece_header(1, Codec.RAW, 100) == pw["piece_header"]
    assert srv.reject(2, RejectReason.NOT_HAVE) == pw["reject"]


def test_name_record_vector() -> None:
    nr = V["name_record"]
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(nr["private_key_seed"]))
    rec = sign_name_record(key, "org/model", MID, "1.0", 7)  # Ed25519 is deterministic
    assert rec.key == nr["key"]
    assert rec.encode().hex() == nr["value"]
    assert verify_name_record(nr["key"], bytes.fromhex(nr["value"])) == rec
