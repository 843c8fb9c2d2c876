"""The swarm key gates control sessions (issue 11, item 12): KeyProof first, or nothing."""

from __future__ import annotations

import pytest

from autoglm.protocol._control import (
    ControlConnection,
    GetManifest,
    Hello,
    KeyProof,
    swarm_key_proof,
)
from autoglm.protocol._errors import LocalProtocolError, RemoteProtocolError
from autoglm.protocol._frames import NEED_DATA

KEY, OTHER = b"k" * 32, b"x" * 32


def _conn(key: bytes | None, me: str, peer: str) -> ControlConnection:
    proofs = None if key is None else (swarm_key_proof(key, me, peer), swarm_key_proof(key, peer, me))
    return ControlConnection(0.0, key_proof=proofs)


def _hello() -> Hello:
    return Hello((), None, b"t" * 16)


def test_proof_is_bound_to_key_and_direction() -> None:
    p = swarm_key_proof(KEY, "a", "b")
    assert len(p) == 32
    assert p != swarm_key_proof(KEY, "b", "a") and p != swarm_key_proof(OTHER, "a", "b")
    assert swarm_key_proof(KEY, "ab", "c") != swarm_key_proof(KEY, "a", "bc")


def test_both_holding_the_key_handshake() -> None:
    a, b = _conn(KEY, "A", "B"), _conn(KEY, "B", "A")
    with pytest.raises(LocalProtocolError):
        a.send(_hello(), 0.0)  # nothing before our proof ...
    b.receive_data(a.send(KeyProof(swarm_key_proof(KEY, "A", "B")), 0.0), 0.0)
    with pytest.raises(LocalProtocolError):
        a.send(_hello(), 0.0)  # ... nor before theirs checked
    assert isinstance(b.next_event(), KeyProof) and b.proven
    a.receive_data(b.send(KeyProof(swarm_key_proof(KEY, "B", "A")), 0.0), 0.0)
    assert isinstance(a.next_event(), KeyProof)
    b.receive_data(a.send(_hello(), 0.0), 0.0)
    assert b.next_event() == _hello()


@pytest.mark.parametrize(
    ("theirs", "first"),
    [
        (None, "hello"),  # a node without the key speaks first: refused before anything is processed
        (None, "getmanifest"),
        (OTHER, "proof"),  # the wrong key
        (KEY, "proof-for-someone-else"),  # a proof bound to other ids
    ],
)
def test_a_peer_without_the_key_gets_nothing_processed(theirs: bytes | None, first: str) -> None:
    me = _conn(KEY, "A", "B")
    attacker = ControlConnection(0.0)
    if first == "hello":
        data = attacker.send(_hello(), 0.0)
    elif first == "getmanifest":
        from autoglm.protocol._control import encode_control

        data = encode_control(GetManifest(b"\x01" * 32))
    elif first == "proof":
        assert theirs is not None
        data = _conn(theirs, "B", "A").send(KeyProof(swarm_key_proof(theirs, "B", "A")), 0.0)
    else:
        data = _conn(KEY, "C", "A").send(KeyProof(swarm_key_proof(KEY, "C", "A")), 0.0)
    me.receive_data(data, 0.0)
    with pytest.raises(RemoteProtocolError):
        me.next_event()
    assert not me.proven


def test_a_node_without_a_key_refuses_a_proof_and_never_sends_one() -> None:
    plain = ControlConnection(0.0)
    with pytest.raises(LocalProtocolError):
        plain.send(KeyProof(b"\0" * 32), 0.0)
    plain.receive_data(_conn(KEY, "B", "A").send(KeyProof(swarm_key_proof(KEY, "B", "A")), 0.0), 0.0)
    with pytest.raises(RemoteProtocolError, match="requires a swarm key"):
        plain.next_event()


def test_a_second_proof_is_refused() -> None:
    me, peer = _conn(KEY, "A", "B"), _conn(KEY, "B", "A")
    proof = peer.send(KeyProof(swarm_key_proof(KEY, "B", "A")), 0.0)
    me.receive_data(proof + proof, 0.0)
    assert isinstance(me.next_event(), KeyProof)
    with pytest.raises(RemoteProtocolError, match="twice"):
        me.next_event()


def test_no_key_no_change() -> None:
    a, b = ControlConnection(0.0), ControlConnection(0.0)
    b.receive_data(a.send(_hello(), 0.0), 0.0)
    assert b.next_event() == _hello() and b.next_event() is NEED_DATA and b.proven
