"""The dial policy and budget (protocol/_dialpolicy.py): which addresses a peer may make us dial (issue 11, item 7)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.protocol._dialpolicy import DialBudget, allowed_addrs, may_dial, multiaddr_host

LOOP, LAN, ANY, PUB = ["127.0.0.1"], ["192.168.1.10"], ["0.0.0.0"], ["203.0.113.9"]


@pytest.mark.parametrize(
    ("host", "listen", "ok"),
    [
        ("8.8.8.8", PUB, True),  # public: always
        ("8.8.8.8", LOOP, True),
        ("2606:4700::1111", LAN, True),
        ("127.0.0.1", LOOP, True),  # our own scope: the tests and the demo
        ("127.0.0.5", LOOP, True),
        ("127.0.0.1", LAN, False),  # loopback from a remote peer: never
        ("127.0.0.1", ANY, False),
        ("::1", PUB, False),
        ("192.168.1.77", LAN, True),  # our private block
        ("192.168.1.77", ANY, True),  # listening everywhere: on every private block
        ("10.0.0.1", LAN, False),  # another private block
        ("10.0.0.1", PUB, False),
        ("10.0.0.1", LOOP, False),
        ("172.16.5.5", ["172.31.0.1"], True),
        ("100.64.0.1", ["100.100.1.1"], True),
        ("fd00::1", ["fd12::2"], True),
        ("fd00::1", LAN, False),
        ("169.254.169.254", ANY, False),  # link-local (cloud metadata): never
        ("169.254.169.254", ["169.254.1.1"], False),
        ("fe80::1", ANY, False),
        ("0.0.0.0", LOOP, False),
        ("224.0.0.1", ANY, False),
        ("240.0.0.1", PUB, False),  # reserved
        ("::ffff:127.0.0.1", LAN, False),  # mapped loopback
        ("example.com", PUB, False),  # names are never resolved for a peer
        ("", PUB, False),
    ],
)
def test_may_dial(host: str, listen: list[str], ok: bool) -> None:
    assert may_dial(host, listen) is ok


@pytest.mark.parametrize(
    ("addr", "host"),
    [
        ("/ip4/1.2.3.4/tcp/5/p2p/12D3", "1.2.3.4"),
        ("/ip6/::1/tcp/5", "::1"),
        ("/dns4/evil.example/tcp/80", None),
        ("/ip4/::1/tcp/5", None),
        ("/ip6/1.2.3.4/tcp/5", None),
        ("ip4/1.2.3.4", None),
        ("/ip4", None),
        ("/ip4/999.1.1.1/tcp/1", None),
    ],
)
def test_multiaddr_host(addr: str, host: str | None) -> None:
    assert multiaddr_host(addr) == host


def test_allowed_addrs_keeps_only_dialable() -> None:
    addrs = ("/ip4/127.0.0.1/tcp/1", "/ip4/10.1.1.1/tcp/2", "/dns4/x/tcp/3", "/ip4/8.8.4.4/tcp/4")
    assert allowed_addrs(addrs, LOOP) == ("/ip4/127.0.0.1/tcp/1", "/ip4/8.8.4.4/tcp/4")
    assert allowed_addrs(addrs, PUB) == ("/ip4/8.8.4.4/tcp/4",)


def test_dial_budget_caps_per_introducer_and_total_and_dedupes() -> None:
    b = DialBudget(per_peer=2, total=3)
    assert b.admit("a", "x", 0.0) and b.admit("a", "y", 0.0)
    assert not b.admit("a", "z", 0.0)  # a's share is spent
    assert not b.admit("b", "x", 0.0)  # queued already
    assert b.admit("b", "z", 0.0)
    assert not b.admit("c", "w", 0.0)  # all spent
    b.done("x")
    assert b.queued_by("a") == 1 and len(b) == 2
    assert b.admit("c", "w", 0.0)


def test_dial_budget_refills_at_its_rate() -> None:
    """Fresh ids in a loop, each dial ending at once: a burst, then one a second."""
    b = DialBudget(per_peer=16, total=64, burst=4, rate=1.0)
    got = []
    for k in range(40):
        t = k / 10  # ten names a second for four seconds
        if b.admit("a", f"p{k}", t):
            got.append(t)
            b.done(f"p{k}")
    assert got[:4] == [0.0, 0.1, 0.2, 0.3] and got[4:] == [1.0, 2.0, 3.0]  # 4 at once, then 1 per second


@settings(max_examples=200)
@given(ops=st.lists(st.tuples(st.booleans(), st.sampled_from("abcd"), st.sampled_from("uvwxyz")), max_size=60))
def test_dial_budget_never_exceeds_its_caps(ops: list[tuple[bool, str, str]]) -> None:
    b = DialBudget(per_peer=2, total=4)
    for add, who, target in ops:
        if add:
            b.admit(who, target, 0.0)
        else:
            b.done(target)
        assert len(b) <= 4 and all(b.queued_by(p) <= 2 for p in "abcd")
