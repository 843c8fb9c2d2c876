"""Hypothesis state machines over the control session's and peerwire server's pure state, hostile interleavings.

A hostile peer may send any message in any order: duplicate Hellos, Have
before Announce, Claims for pieces nobody announced, Cancels for ids never
asked, bytes split anywhere, garbage, an early end of stream, long silences.
Whatever it does, the sans-IO state must stay within its budgets and the
only exceptions are the project's protocol errors (after a
RemoteProtocolError the node ends the session, so the machine stops feeding).
Models: h2's tests/test_state_machines.py; h11's "parse or raise" fuzz rule.
"""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from autoglm.protocol._bitfield import Bitfield
from autoglm.protocol._control import (
    MAX_CONTROL_FRAME,
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
    KeyProof,
    ManifestData,
    ManifestState,
    NotInterested,
    PeerInfo,
    Peers,
    Phase,
    Token,
    TokenRequest,
    Unchoke,
    encode_control,
)
from autoglm.protocol._errors import LocalProtocolError, ProtocolError
from autoglm.protocol._frames import NEED_DATA
from autoglm.protocol._frames import encode_frame as _encode_frame
from autoglm.protocol._peerwire import MAX_INFLIGHT, Cancel, PeerwireServer, RejectReason, Request

MIDS = [bytes([k]) * 32 for k in range(3)]


def encode_frame(payload: bytes) -> bytes:
    return _encode_frame(payload, MAX_CONTROL_FRAME)


MAX_MANIFESTS = 2
MAX_BITS = 64  # bytes of bitfields the peer may make us keep

# Mostly well-formed, so sessions get past Hello and the interleavings matter;
# sometimes malformed, which must end the session with a protocol error.
mids = st.one_of(st.sampled_from(MIDS), st.sampled_from(MIDS), st.sampled_from(MIDS), st.binary(max_size=40))
tokens = st.one_of(st.binary(min_size=16, max_size=32), st.binary(min_size=16, max_size=32), st.binary(max_size=70))


@st.composite
def states(draw: st.DrawFn) -> ManifestState:
    n = draw(st.integers(0, 600))
    right = (n + 7) // 8
    size = draw(st.sampled_from([right, right, right, right, right, max(right - 1, 0), right + 1]))
    return ManifestState(draw(mids), n, draw(st.binary(min_size=size, max_size=size)))


hellos = st.builds(
    Hello, st.lists(states(), max_size=3).map(tuple),
    st.none() | st.builds(Endpoint, st.text(min_size=1, max_size=8), st.integers(1, 65535)), tokens,
)
indices = st.integers(0, 700)


@st.composite
def good_states(draw: st.DrawFn) -> ManifestState:
    n = draw(st.integers(1, 300))
    held = draw(st.sets(st.integers(0, n - 1), max_size=n))
    return ManifestState(draw(st.sampled_from(MIDS)), n, Bitfield(n, held).to_bytes())


small = st.integers(0, 40)
known = st.sampled_from(MIDS)
#: Messages a peer may well send in an open session (they still may name a
#: manifest it never announced, or a piece past the end).
plausible: st.SearchStrategy[ControlMessage] = st.one_of(
    st.builds(Have, known, small),
    st.builds(Have, known, small),
    st.builds(Claim, known, st.lists(small, min_size=1, max_size=8).map(tuple)),
    st.builds(Interested, known),
    st.builds(NotInterested, known),
    st.builds(Announce, good_states()),
    st.just(Choke()), st.just(Unchoke()), st.just(Keepalive()), st.just(TokenRequest()),
    st.builds(Token, st.binary(min_size=16, max_size=16)),
    st.builds(GetManifest, known),
    st.builds(ManifestData, known, st.binary(max_size=64)),
)
good_hellos = st.builds(Hello, st.lists(good_states(), max_size=2, unique_by=lambda m: m.manifest_id).map(tuple),
                        st.none(), st.binary(min_size=16, max_size=16))
messages: st.SearchStrategy[ControlMessage] = st.one_of(
    hellos,
    st.builds(Announce, states()),
    st.builds(Have, mids, indices),
    st.builds(Have, mids, indices),
    st.builds(Claim, mids, st.lists(indices, min_size=1, max_size=8).map(tuple)),
    st.builds(Claim, mids, st.lists(indices, max_size=70).map(tuple)),
    st.builds(Interested, mids),
    st.builds(NotInterested, mids),
    st.just(Choke()), st.just(Unchoke()), st.just(Keepalive()), st.just(TokenRequest()),
    st.builds(Token, tokens),
    st.builds(GetManifest, mids),
    st.builds(ManifestData, mids, st.binary(max_size=64)),
    st.builds(Peers, mids, st.lists(st.builds(PeerInfo, st.text(max_size=12), st.lists(st.text(max_size=12), max_size=3).map(tuple)),
                                     max_size=3).map(tuple)),
    st.builds(Close, st.text(max_size=20)),
    st.builds(KeyProof, st.binary(min_size=30, max_size=34)),
)


class HostileControlPeer(RuleBasedStateMachine):
    """Our end of a control session (a real ControlConnection) fed by a peer that breaks every rule."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.conn = ControlConnection(0.0, max_manifests=MAX_MANIFESTS, max_bitfield_bytes=MAX_BITS)
        self.wire = b""  # sent by the peer, not yet fed to us
        self.dead = False  # a RemoteProtocolError ended the session, or the stream ended
        self.events: list[object] = []

    @initialize(hello=st.none() | good_hellos, ours=st.none() | good_hellos)
    def start(self, hello: Hello | None, ours: Hello | None) -> None:
        """Most sessions begin well (both Hellos), so what follows happens in the open phases."""
        if ours is not None:
            self.conn.send(ours, self.now)
        if hello is not None:
            self.conn.receive_data(encode_control(hello), self.now)
            self._drain()

    def _drain(self) -> None:
        try:
            while True:
                ev = self.conn.next_event()
                if ev is NEED_DATA:
                    return
                self.events.append(ev)
        except ProtocolError:
            self.dead = True

    @precondition(lambda self: not self.dead)
    @rule(msg=messages)
    def peer_sends(self, msg: ControlMessage) -> None:
        self.wire += encode_control(msg)

    @precondition(lambda self: not self.dead)
    @rule(msgs=st.lists(plausible, min_size=1, max_size=6))
    def peer_sends_plausible(self, msgs: list[ControlMessage]) -> None:
        self.wire += b"".join(encode_control(m) for m in msgs)

    @precondition(lambda self: not self.dead)
    @rule(msg=hellos)
    def peer_says_hello(self, msg: Hello) -> None:
        """Hello again and again: the first opens the session, a second is out of order."""
        self.wire += encode_control(msg)

    @precondition(lambda self: not self.dead)
    @rule(junk=st.one_of(st.binary(max_size=32), st.binary(max_size=16).map(encode_frame),
                         st.lists(st.integers(-2, 40), max_size=5).map(lambda v: encode_frame(msgpack.packb(v)))))
    def peer_sends_garbage(self, junk: bytes) -> None:
        self.wire += junk

    @precondition(lambda self: not self.dead and bool(self.wire))
    @rule(n=st.integers(1, 512))
    def deliver(self, n: int) -> None:
        chunk, self.wire = self.wire[:n], self.wire[n:]
        self.conn.receive_data(chunk, self.now)
        self._drain()

    @precondition(lambda self: not self.dead)
    @rule()
    def end_of_stream(self) -> None:
        self.conn.receive_data(self.wire, self.now)
        self.conn.receive_data(b"", self.now)
        self.wire = b""
        self._drain()
        if not self.dead:
            assert self.conn.theirs.phase is Phase.CLOSED
        self.dead = True  # nothing more comes from a stream that ended

    @rule(dt=st.floats(0.0, 5.0) | st.floats(0.0, 60.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        try:
            self.conn.handle_timer(self.now)
        except ProtocolError:
            self.dead = True

    @rule(msg=messages)
    def we_send(self, msg: ControlMessage) -> None:
        try:
            self.conn.send(msg, self.now)
        except LocalProtocolError:
            pass  # not allowed now: refused before any byte

    @invariant()
    def state_is_bounded(self) -> None:
        theirs = self.conn.theirs
        assert len(theirs.manifests) <= MAX_MANIFESTS
        assert sum((bf.size + 7) // 8 for bf in theirs.manifests.values()) <= MAX_BITS
        assert theirs.interested <= set(self.conn.ours.manifests)
        deadline = self.conn.next_deadline()
        assert deadline is None or deadline >= 0.0
        assert len(self.events) <= 10_000

    @invariant()
    def a_closed_peer_says_nothing_more(self) -> None:
        if self.conn.theirs.phase is Phase.CLOSED and not self.dead:
            assert self.conn.next_event() is NEED_DATA or self.dead


TestHostileControlPeer = HostileControlPeer.TestCase
TestHostileControlPeer.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


# -- the peerwire server: Cancels and Requests in any order ------------------------------------------


def _client_frame(v: list[Any]) -> bytes:
    return encode_frame(msgpack.packb(v))


class HostilePeerwireClient(RuleBasedStateMachine):
    """A real PeerwireServer fed Auth, Requests and Cancels in any order, ids reused, never asked."""

    def __init__(self) -> None:
        super().__init__()
        self.server = PeerwireServer()
        self.authed = False
        self.dead = False
        self.open: set[int] = set()  # what the server passed on and we have not answered

    def _feed(self, data: bytes) -> None:
        self.server.receive_data(data)
        try:
            while True:
                ev = self.server.next_event()
                if ev is NEED_DATA:
                    return
                if isinstance(ev, Request):
                    assert ev.req_id not in self.open
                    self.open.add(ev.req_id)
                elif isinstance(ev, Cancel):
                    assert ev.req_id in self.open, "a Cancel for an id never asked was passed on"
                else:  # Auth
                    self.server.accept()
                    self.authed = True
        except ProtocolError:
            self.dead = True

    @precondition(lambda self: not self.dead)
    @rule(token=st.binary(max_size=40))
    def auth(self, token: bytes) -> None:
        self._feed(_client_frame([1, 1, token]))

    @precondition(lambda self: not self.dead)
    @rule(req_id=st.integers(0, 20) | st.integers(2**32 - 2, 2**32 + 1), mid=st.binary(min_size=31, max_size=33),
          index=st.integers(-1, 10), zstd=st.booleans() | st.just(1))
    def request(self, req_id: int, mid: bytes, index: int, zstd: Any) -> None:
        self._feed(_client_frame([2, req_id, mid, index, zstd]))

    @precondition(lambda self: not self.dead)
    @rule(req_id=st.integers(-1, 40))
    def cancel(self, req_id: int) -> None:
        self._feed(_client_frame([3, req_id]))

    @rule(junk=st.binary(min_size=1, max_size=24))  # (b"" would be the end of the stream)
    def garbage(self, junk: bytes) -> None:
        if not self.dead:  # (no precondition: some rule must always apply)
            self._feed(junk)

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data())
    def we_answer(self, data: st.DataObject) -> None:
        req_id = data.draw(st.sampled_from(sorted(self.open)))
        self.server.reject(req_id, RejectReason.NOT_HAVE)
        self.open.discard(req_id)

    @invariant()
    def bounded(self) -> None:
        assert self.server.queued <= MAX_INFLIGHT
        assert self.server.queued == len(self.open) or self.dead


TestHostilePeerwireClient = HostilePeerwireClient.TestCase
TestHostilePeerwireClient.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)



def test_sending_a_state_whose_bitfield_does_not_fit_is_a_local_error() -> None:
    """Found by HostileControlPeer: our own bad Hello raised RemoteProtocolError and kept half of it."""
    import pytest

    conn = ControlConnection(0.0)
    good = ManifestState(MIDS[0], 8, b"\xff")
    bad = ManifestState(MIDS[1], 0, b"\x00")
    with pytest.raises(LocalProtocolError):
        conn.send(Hello((good, bad), None, b"t" * 16), 0.0)
    assert conn.ours.manifests == {} and conn.ours.phase is Phase.IDLE
