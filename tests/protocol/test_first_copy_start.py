"""The start race: a fetcher whose Interested is still on its way keeps its share of the first copy.

At N=16 a fetch's first mirror picks came while it counted 0-4 of the 15
other fetchers as members although it knew 14 of them as holders: a holder
of nothing counted only once its Interested had arrived, a round trip after
our Announce (seconds under load), so the fetch took the others' shares from
the mirror as its own (docs/benchmarks.md, "The start race"). Now a holder
of nothing is a member for its first ``first_round`` seconds
(protocol/_membership.py); a truly idle one (the publisher's node keeping an
envelope) is out after that. And a member whose session reset stays departed
until it announces again, not merely until it is in session again.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.protocol._membership import membership
from autoglm.protocol._ownership import FirstCopy

GRACE = 5.0
ROUND = 1.0


@pytest.mark.parametrize(
    ("holders", "idle", "departed", "now", "peers", "complete", "next_change"),
    [
        # a holder of nothing is a member for its first round, from when it became one ...
        ([("a", False)], {"a": 10.0}, {}, 10.0, "a", "", 11.0),
        ([("a", False)], {"a": 10.0}, {}, 10.999, "a", "", 11.0),
        # ... and no member from exactly then (it never said Interested: not fetching)
        ([("a", False)], {"a": 10.0}, {}, 11.0, "", "", math.inf),
        # an idle holder given as a plain collection has had its round long ago
        ([("a", False)], {"a"}, {}, 0.0, "", "", math.inf),
        # a complete holder is a member whatever (a preheated publisher)
        ([("a", True)], {"a": 10.0}, {}, 50.0, "", "a", math.inf),
        # fetchers are members with no deadline; the earliest round or grace is the next change
        ([("a", False), ("b", False), ("c", False)], {"b": 10.0, "c": 10.5}, {"d": (8.0, False)}, 10.2,
         "abcd", "", 11.0),
        ([("a", False)], {}, {"d": (8.0, True)}, 10.2, "a", "d", 13.0),
        # departed and in session again, its Hello not here yet: still departed, as it was
        ([], {}, {"d": (8.0, False)}, 9.0, "d", "", 13.0),
        # announced again (a holder): counted once, as a holder; its departure is over
        ([("d", False)], {}, {"d": (8.0, True)}, 9.0, "d", "", math.inf),
        # announced again with nothing: a holder in its first round, not a departed member
        ([("d", False)], {"d": 9.0}, {"d": (8.0, False)}, 9.5, "d", "", 10.0),
    ],
)
def test_first_round_and_departures_table(
    holders: list[tuple[str, bool]], idle: dict[str, float] | set[str], departed: dict[str, tuple[float, bool]],
    now: float, peers: str, complete: str, next_change: float,
) -> None:
    m = membership(holders, departed, banned=(), now=now, grace=GRACE, idle=idle, first_round=ROUND)
    assert (m.peers, m.complete, m.next_change) == (tuple(peers), tuple(complete), next_change)


def test_banned_in_its_first_round_is_no_member() -> None:
    m = membership([("a", False)], {}, banned={"a"}, now=0.0, grace=GRACE, idle={"a": 0.0}, first_round=ROUND)
    assert (m.peers, m.next_change) == ((), math.inf)


_peer = st.sampled_from("abcdefgh")


@settings(max_examples=300)
@given(
    holders=st.dictionaries(_peer, st.booleans()),
    idle=st.dictionaries(_peer, st.floats(0, 20)),
    departed=st.dictionaries(_peer, st.tuples(st.floats(0, 20), st.booleans())),
    banned=st.sets(_peer, max_size=2),
    now=st.floats(0, 30),
    later=st.floats(0, 1),
)
def test_members_change_by_time_only_at_next_change(
    holders: dict[str, bool], idle: dict[str, float], departed: dict[str, tuple[float, bool]],
    banned: set[str], now: float, later: float,
) -> None:
    """Time alone only ever removes members, never before ``next_change``, and always at it."""
    idle = {p: t for p, t in idle.items() if p in holders and t <= now}

    def at(t: float) -> tuple[frozenset[str], float]:
        m = membership(holders.items(), departed, banned=banned, now=t, grace=GRACE, idle=idle, first_round=ROUND)
        assert len(m.peers + m.complete) == len(set(m.peers + m.complete)), "a peer counted twice"
        return frozenset(m.peers + m.complete), m.next_change

    members, nxt = at(now)
    assert nxt > now
    if nxt == math.inf:
        assert at(now + 100.0)[0] == members
        return
    between = now + later * (nxt - now) * 0.999
    assert at(between)[0] == members
    after, _ = at(nxt)
    assert after < members  # a strict subset: someone's round or grace ended, nobody joined


# -- the first copy, with the others' Interested still on its way ----------------------------------

N = 64


def _node(me: str, others: list[str], now: float = 0.0) -> FirstCopy:
    """``me`` at its first picks: the others announced the manifest with nothing of it, no Interested yet."""
    m = membership([(p, False) for p in others], {}, banned=(), now=now, grace=GRACE,
                   idle=dict.fromkeys(others, now), first_round=ROUND)
    fc = FirstCopy(me, [8 << 20] * N, owner_timeout=20.0, max_scale=1.0)
    fc.set_members([*m.peers, *m.complete], now)
    return fc


def test_a_fetch_in_its_first_round_leaves_the_others_shares_alone() -> None:
    """Before: with 14 holders known and none counted, every piece was this node's own share."""
    others = [f"p{i:02d}" for i in range(14)]
    fc = _node("me", others, now=0.0)
    takes = [i for i in range(N) if fc.mirror_may_take(i, 0.5)]
    assert len(takes) == -(-N // 15)  # its own share at once: no hold on what is surely ours
    assert all(fc.owner(i) == "me" for i in takes)
    # The round is over and none of them said Interested (idle announcers): the whole model is ours.
    m = membership([(p, False) for p in others], {}, banned=(), now=ROUND, grace=GRACE,
                   idle=dict.fromkeys(others, 0.0), first_round=ROUND)
    assert m.peers == ()
    fc.set_members(m.peers, ROUND)
    assert all(fc.mirror_may_take(i, ROUND) for i in range(N))


def test_a_fetch_alone_is_never_held() -> None:
    m = membership([], {}, banned=(), now=0.0, grace=GRACE, idle={}, first_round=ROUND)
    assert (m.peers, m.complete, m.next_change) == ((), (), math.inf)
    fc = _node("me", [])
    assert all(fc.mirror_may_take(i, 0.0) for i in range(N))


@settings(max_examples=50, deadline=None)
@given(k=st.integers(2, 8), seed=st.integers(0, 10_000), t=st.floats(0, 0.99))
def test_fetchers_started_together_take_disjoint_first_copies(k: int, seed: int, t: float) -> None:
    """k fetchers that know each other only as holders of nothing (every Interested still on its way) agree:
    each piece may come from a mirror at exactly one of them, within the first round."""
    ids = [f"n{seed}-{j}" for j in range(k)]
    nodes = [_node(me, [p for p in ids if p != me]) for me in ids]
    for i in range(N):
        assert sum(fc.mirror_may_take(i, t) for fc in nodes) == 1


def test_a_departed_member_is_relayed_its_share_unmoved_its_progress_seen_through_others() -> None:
    """A member whose session reset is passed as relayed while its grace lasts (node/swarm/fetches.py): no piece
    changes owner, and a Have of one of its pieces from another member keeps it from going stale."""
    fc = FirstCopy("me", [8 << 20] * N, owner_timeout=20.0, max_scale=1.0)
    fc.set_members(["b", "c"], 0.0)
    bs = [i for i in range(N) if fc.owner(i) == "b"]
    assert not fc.set_members(["c"], 5.0, relayed=["b"])  # b's stream reset: the same owners
    assert fc.progress("c", bs[0], 15.0, wanted=True)  # c got b's first copy: b's progress, relayed
    assert not fc.mirror_may_take(bs[1], 30.0)  # silent since 0 it would be stale at 20 s; it showed at 15 s
    assert fc.mirror_may_take(bs[1], 35.0)  # and it is, 20 s after that
