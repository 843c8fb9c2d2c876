"""First-copy ownership in swarms larger than one node's sessions: relayed members and successors (protocol/_ownership.py)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.protocol._ownership import FirstCopy, _ranks

SIZE = 100


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 40), pieces=st.integers(1, 70), degree=st.integers(1, 8), seed=st.integers(0, 1000))
def test_partial_sessions_agree_on_one_owner_per_piece(n: int, pieces: int, degree: int, seed: int) -> None:
    """Each node in session with a few others, the rest relayed: every node sees the same owner of every piece."""
    rng = random.Random(seed)
    ids = [f"n{k}" for k in range(n)]
    views = []
    for me in ids:
        others = [p for p in ids if p != me]
        sessions = set(rng.sample(others, min(degree, len(others))))
        fc = FirstCopy(me, [SIZE] * pieces)
        fc.set_members(sessions, 0.0, relayed=set(others) - sessions)
        assert fc.members() == set(others)
        views.append(tuple(fc.owner(i) for i in range(pieces)))
    assert len(set(views)) == 1, "nodes with different sessions but the same swarm disagree"
    owners = views[0]
    assert max(owners.count(p) for p in ids) <= -(-pieces // n)  # bounded loads over the whole swarm


def test_sessions_only_disagree_which_relayed_members_fix() -> None:
    """The flaw: ranking over sessions alone gives pieces several owners once the swarm outgrows them."""
    ids = [f"n{k}" for k in range(12)]
    ring = {p: {ids[(k - 1) % 12], ids[(k + 1) % 12]} for k, p in enumerate(ids)}
    alone, shared = [], []
    for me in ids:
        a = FirstCopy(me, [SIZE] * 24)
        a.set_members(ring[me], 0.0)
        b = FirstCopy(me, [SIZE] * 24)
        b.set_members(ring[me], 0.0, relayed=set(ids) - ring[me])
        alone.append(sum(a.owner(i) == me for i in range(24)))
        shared.append(sum(b.owner(i) == me for i in range(24)))
    assert sum(alone) > 24  # several first copies of some pieces
    assert sum(shared) == 24  # exactly one


def test_moving_between_session_and_gossip_changes_no_owner() -> None:
    fc = FirstCopy("me", [SIZE] * 16)
    assert fc.set_members(["a"], 0.0, relayed=["b"])
    before = [fc.owner(i) for i in range(16)]
    assert not fc.set_members(["a", "b"], 1.0)  # b's session opened
    assert not fc.set_members(["b"], 2.0, relayed=["a"])  # a's closed, a still gossiped
    assert [fc.owner(i) for i in range(16)] == before


def _relayed_owner(n: int = 16) -> tuple[FirstCopy, list[int]]:
    fc = FirstCopy("me", [SIZE] * n, owner_timeout=20.0, deliver_timeout=10.0, max_scale=1.0)
    fc.set_members(["s"], 0.0, relayed=["r"])
    theirs = [i for i in range(n) if fc.owner(i) == "r"]
    assert len(theirs) >= 2
    return fc, theirs


def test_a_relayed_owner_goes_stale_like_a_silent_one() -> None:
    """A gossiped id that never brings a piece in (a fake) loses its share owner_timeout after it is known."""
    fc, theirs = _relayed_owner()
    assert not fc.mirror_may_take(theirs[0], 19.9)
    assert fc.mirror_may_take(theirs[0], 20.0)
    assert not fc.progress("r", theirs[0], 5.0, wanted=True)  # no session: it cannot speak for itself


def test_relayed_progress_is_a_session_peers_first_have_of_its_piece() -> None:
    fc, theirs = _relayed_owner()
    assert fc.progress("s", theirs[0], 15.0, wanted=True)  # its first copy reached our neighbourhood
    assert not fc.mirror_may_take(theirs[1], 34.9)
    assert fc.mirror_may_take(theirs[1], 35.0)  # 20 s after that
    assert not fc.progress("s", theirs[0], 30.0, wanted=True)  # the same piece again: nothing new


@pytest.mark.parametrize(("asked", "done", "lapses_at"), [(16.0, False, 26.0), (16.0, True, 35.0), (None, False, 35.0)])
def test_a_relayed_have_is_a_promise_for_the_owner(asked: float | None, done: bool, lapses_at: float) -> None:
    """The piece a session peer advertised for a relayed owner must reach us, or the owner's share goes."""
    fc, theirs = _relayed_owner()
    assert fc.progress("s", theirs[0], 15.0, wanted=True)
    if asked is not None:
        fc.requested(theirs[0], asked)
    if done:
        fc.piece_done(theirs[0])  # delivered: the owner is silent from 35 s only
    assert not fc.mirror_may_take(theirs[1], lapses_at - 0.01)
    assert fc.mirror_may_take(theirs[1], lapses_at)


def _three(me: str = "me") -> tuple[FirstCopy, str, int, list[int]]:
    """Members a, b and this node; a piece owned by a whose next in rendezvous order is b; the other pieces."""
    fc = FirstCopy(me, [SIZE] * 64, owner_timeout=20.0, max_scale=1.0)
    fc.set_members(["a", "b"], 0.0)
    w = {p: _ranks(p, 64) for p in ("b", me)}
    i = next(i for i in range(64) if fc.owner(i) == "a" and (w["b"][i], "b") > (w[me][i], me))
    return fc, "b", i, [k for k in range(64) if k != i]


def test_a_stale_owner_s_piece_waits_for_a_successor_that_delivers() -> None:
    fc, b, i, rest = _three()
    fc.delivered("peer:a", rest[2])  # a delivers, just slowly: an honest owner
    fc.delivered(f"peer:{b}@0123abcd", rest[0])  # b brought us a verified piece (an alias source id)
    fc.progress(b, rest[1], 15.0, wanted=True)
    fc.piece_done(rest[1])
    assert not fc.mirror_may_take(i, 20.0)  # a is stale; b has owner_timeout to bring it in
    assert not fc.mirror_may_take(i, 34.9)
    assert fc.mirror_may_take(i, 35.0)  # b silent too: its successor is this node
    assert 40.0 in fc.deadlines([i])


def test_a_stale_owner_s_piece_waits_at_most_owner_timeout_for_its_successor() -> None:
    fc, b, i, rest = _three()
    fc.delivered("a", rest[-1])
    fc.delivered(b, rest[0])
    for t, k in zip(range(15, 100, 10), rest[1:], strict=False):
        fc.progress(b, k, float(t), wanted=True)
        fc.piece_done(k)
    assert not fc.mirror_may_take(i, 39.9)
    assert fc.mirror_may_take(i, 40.0)  # 20 s after a went stale, whatever b does


def test_an_owner_that_never_delivered_loses_its_piece_to_the_mirror_at_once() -> None:
    """A fake (Haves, never a piece) goes stale exactly as before: no successor gets its share (the liar bounds)."""
    fc, b, i, rest = _three()
    fc.delivered(b, rest[0])
    fc.progress(b, rest[1], 15.0, wanted=True)
    assert not fc.mirror_may_take(i, 19.9)
    assert fc.mirror_may_take(i, 20.0)


def test_no_successor_that_never_delivered() -> None:
    """Members that never brought us a piece (fakes among them) cannot hold a stale owner's piece."""
    fc, b, i, rest = _three()
    fc.delivered("a", rest[2])
    fc.progress(b, rest[0], 15.0, wanted=True)  # Haves alone do not make b a successor
    assert fc.mirror_may_take(i, 20.0)
    fc.delivered("peer:stranger", rest[1])  # not a member: ignored
    fc.delivered("me", rest[1])
    assert fc.mirror_may_take(i, 20.0)


def test_a_successor_that_leaves_is_forgotten() -> None:
    fc, b, i, rest = _three()
    fc.delivered("a", rest[2])
    fc.delivered(b, rest[0])
    fc.set_members(["a"], 1.0)
    fc.set_members(["a", b], 2.0)  # back with a new session: it must deliver again
    assert fc.mirror_may_take(i, 20.0)
