"""Control protocol /autoglm/swarm/1: table, byte-at-a-time, Hypothesis, fuzz, timers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoglm.protocol import LocalProtocolError, RemoteProtocolError
from autoglm.protocol._bitfield import Bitfield
from autoglm.protocol._control import (
    TRANSITIONS,
    Announce,
    Choke,
    Claim,
    Close,
    ControlConnection,
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
    Phase,
    Token,
    TokenRequest,
    Unchoke,
    decode_control,
    encode_control,
)
from autoglm.protocol._frames import NEED_DATA

MID = bytes(range(32))
MID2 = bytes(32)
TOKEN = b"t" * 32
STATE = ManifestState(MID, 10, Bitfield(10, [0, 3, 9]).to_bytes())

ALL: list[ControlMessage] = [
    Hello((STATE,), Endpoint("127.0.0.1", 4000), TOKEN),
    Announce(ManifestState(MID2, 3, b"\x00")),
    Have(MID, 5),
    Interested(MID),
    NotInterested(MID),
    Choke(),
    Unchoke(),
    Keepalive(),
    TokenRequest(),
    Token(TOKEN),
    GetManifest(MID),
    ManifestData(MID, b"envelope"),
    Peers(MID, (PeerInfo("12D3KooWPeer", ("/ip4/127.0.0.1/tcp/4001",)), PeerInfo("12D3KooWNoAddr", ()))),
    Claim(MID, (0, 9)),
    Close("bye"),
]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_roundtrip(msg: ControlMessage) -> None:
    assert decode_control(encode_control(msg)[4:]) == msg


def _pair() -> tuple[ControlConnection, ControlConnection]:
    return ControlConnection(0.0), ControlConnection(0.0)


def _events(c: ControlConnection) -> list[ControlMessage]:
    out = []
    while (e := c.next_event()) is not NEED_DATA:
        assert not isinstance(e, type(NEED_DATA))
        out.append(e)
    return out


SESSION: list[ControlMessage] = [
    Hello((STATE,), Endpoint("127.0.0.1", 4000), TOKEN),
    Announce(ManifestState(MID2, 3, b"\x00")),
    Have(MID, 5),
    Have(MID2, 2),
    Unchoke(),
    Keepalive(),
    Choke(),
    TokenRequest(),
    Token(b"u" * 16),
    Peers(MID2, (PeerInfo("12D3KooWPeer", ("/ip4/127.0.0.1/tcp/4001", "/ip4/10.0.0.2/tcp/4001")),)),
    Claim(MID, (3, 9)),
    Claim(MID2, (0, 1, 2)),
    Close("done"),
]


def test_session_whole_and_byte_at_a_time() -> None:
    a, _ = _pair()
    wire = b"".join(a.send(m, 1.0) for m in SESSION)
    whole = ControlConnection(0.0)
    whole.receive_data(wire, 1.0)
    assert _events(whole) == SESSION
    slow = ControlConnection(0.0)
    got: list[ControlMessage] = []
    for i in range(len(wire)):
        slow.receive_data(wire[i : i + 1], 1.0)
        got += _events(slow)
    assert got == SESSION
    assert set(slow.theirs.manifests[MID]) == {0, 3, 5, 9}
    assert set(slow.theirs.manifests[MID2]) == {2}
    assert slow.theirs.token == b"u" * 16 and slow.theirs.phase is Phase.CLOSED
    assert slow.theirs.endpoint == Endpoint("127.0.0.1", 4000)


@pytest.mark.parametrize(
    "before, msg",
    [
        ([], Have(MID, 1)),
        ([], Unchoke()),
        ([], Keepalive()),
        ([Hello((), None, TOKEN)], Hello((), None, TOKEN)),
        ([Hello((), None, TOKEN)], Have(MID, 1)),  # never announced
        ([Hello((STATE,), None, TOKEN)], Have(MID, 10)),  # out of range
        ([Hello((), None, TOKEN), Close()], Keepalive()),
        ([Hello((), None, TOKEN)], Interested(MID)),  # we never announced MID
        ([Hello((), None, TOKEN)], Claim(MID, (1,))),  # they never announced MID
        ([Hello((STATE,), None, TOKEN)], Claim(MID, (2, 10))),  # out of range
        ([], Claim(MID, (1,))),  # before Hello
    ],
)
def test_remote_errors_table(before: list[ControlMessage], msg: ControlMessage) -> None:
    c = ControlConnection(0.0)
    c.receive_data(b"".join(encode_control(m) for m in before) + encode_control(msg), 0.0)
    with pytest.raises(RemoteProtocolError):
        _events(c)


@pytest.mark.parametrize(
    "value, why",
    [
        ([14, MID, [["p", ["/ip4/1.2.3.4/tcp/1"]]] * 51], "at most 50"),
        ([14, MID, [["p", ["/a"] * 9]]], "at most 8 addresses"),
        ([14, MID, [["", []]]], "peer id"),
        ([14, MID, [["x" * 129, []]]], "peer id"),
        ([14, MID, [["p", [""]]]], "multiaddr"),
        ([14, MID, [["p", [b"bytes"]]]], "multiaddr"),
        ([14, MID, [["p"]]], "peer must be"),
        ([14, MID, "not a list"], "array"),
        ([14, b"short", []], "manifest id"),
    ],
)
def test_peers_malformed(value: list[object], why: str) -> None:
    from autoglm.protocol._codec import encode_frame_payload

    with pytest.raises(RemoteProtocolError, match=why):
        decode_control(encode_frame_payload(value))


@pytest.mark.parametrize(
    "value, why",
    [
        ([15, MID, []], "1..64"),
        ([15, MID, list(range(65))], "array"),
        ([15, MID, [True]], "piece index"),
        ([15, MID, [-1]], "piece index"),
        ([15, MID, ["1"]], "piece index"),
        ([15, MID, 3], "array"),
        ([15, b"short", [1]], "manifest id"),
        ([15, MID], "fields"),
    ],
)
def test_claim_malformed(value: list[object], why: str) -> None:
    from autoglm.protocol._codec import encode_frame_payload

    with pytest.raises(RemoteProtocolError, match=why):
        decode_control(encode_frame_payload(value))


def test_local_errors() -> None:
    c = ControlConnection(0.0)
    with pytest.raises(LocalProtocolError):
        c.send(Have(MID, 0), 0.0)
    c.send(Hello((), None, TOKEN), 0.0)
    with pytest.raises(LocalProtocolError):
        c.send(Have(MID, 0), 0.0)
    with pytest.raises(LocalProtocolError):
        c.send(Interested(MID), 0.0)  # they never announced it
    with pytest.raises(LocalProtocolError):
        c.send(Claim(MID, (0,)), 0.0)  # we never announced it
    c.send(Announce(ManifestState(MID, 4, b"\x00")), 0.0)
    c.send(Claim(MID, (0, 3)), 0.0)
    for bad in (Claim(MID, ()), Claim(MID, (4,)), Claim(MID, tuple(range(65)))):
        with pytest.raises(LocalProtocolError):
            c.send(bad, 0.0)


def test_wrong_version_refused() -> None:
    c = ControlConnection(0.0)
    c.receive_data(encode_control(Hello((), None, TOKEN, version=2)), 0.0)
    with pytest.raises(RemoteProtocolError, match="version"):
        c.next_event()


def test_eof_without_close_is_a_close_event() -> None:
    c = ControlConnection(0.0)
    c.receive_data(encode_control(Hello((), None, TOKEN)), 0.0)
    c.receive_data(b"", 0.0)
    assert _events(c) == [Hello((), None, TOKEN), Close("end of stream")]


def test_timers_exact() -> None:
    c = ControlConnection(100.0, keepalive_interval=15, idle_timeout=45, handshake_timeout=10)
    assert c.next_deadline() == 110.0
    with pytest.raises(RemoteProtocolError, match="no Hello"):
        c.handle_timer(110.0)
    c = ControlConnection(100.0, keepalive_interval=15, idle_timeout=45, handshake_timeout=10)
    c.send(Hello((), None, TOKEN), 100.0)
    c.receive_data(encode_control(Hello((), None, TOKEN)), 102.0)
    _events(c)
    assert c.next_deadline() == 115.0
    assert c.handle_timer(114.9) == b""
    assert decode_control(c.handle_timer(115.0)[4:]) == Keepalive()
    assert c.next_deadline() == 130.0
    c.handle_timer(130.0)
    assert c.next_deadline() == 145.0
    c.handle_timer(145.0)
    assert c.next_deadline() == 147.0  # 102 + 45: idle timeout comes before the next keepalive
    with pytest.raises(RemoteProtocolError, match="silent"):
        c.handle_timer(147.0)


_MSGS = st.sampled_from(ALL[1:] + [Hello((), None, TOKEN)])


@given(st.lists(_MSGS, max_size=12))
def test_hypothesis_state_and_input(seq: list[ControlMessage]) -> None:
    """Any sequence either follows the table exactly or fails with RemoteProtocolError."""
    c = ControlConnection(0.0)
    c.ours.manifests[MID] = Bitfield(10)
    phase = Phase.IDLE
    for msg in seq:
        c.receive_data(encode_control(msg), 0.0)
        expected = TRANSITIONS.get((phase, type(msg)))
        try:
            ev = c.next_event()
        except RemoteProtocolError:
            return
        assert phase is not Phase.CLOSED
        assert expected is not None, (phase, msg)
        assert ev == msg
        phase = expected
        assert c.theirs.phase is phase


@given(st.binary(max_size=200))
def test_fuzz_parse_or_remote_error(data: bytes) -> None:
    c = ControlConnection(0.0)
    c.receive_data(data, 0.0)
    c.receive_data(b"", 0.0)
    try:
        for _ in range(100):
            if c.next_event() is NEED_DATA:
                break
    except RemoteProtocolError:
        pass


@given(st.binary(max_size=200))
def test_fuzz_payload_parse_or_remote_error(data: bytes) -> None:
    try:
        decode_control(data)
    except RemoteProtocolError:
        pass
