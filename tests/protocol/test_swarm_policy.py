"""The swarm's pure policies: membership, choking, first-copy ownership. Tables and Hypothesis; time is a parameter."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.protocol._choking import choose_unchoked
from autoglm.protocol._membership import membership
from autoglm.protocol._ownership import MAX_PEER_CLAIMS, FirstCopy
from autoglm.protocol._picker import MIRROR, PiecePicker, PieceState

# -- membership ------------------------------------------------------------------

GRACE = 5.0


@pytest.mark.parametrize(
    ("holders", "departed", "in_session", "banned", "now", "peers", "complete", "kept"),
    [
        # fetching and complete holders, split
        ([("a", False), ("b", True)], {}, "ab", "", 0.0, "a", "b", ""),
        # a banned holder is no member
        ([("a", False), ("b", False)], {}, "ab", "b", 0.0, "a", "", ""),
        # a departed peer stays, as it was, within the grace ...
        ([], {"c": (10.0, True)}, "", "", 14.9, "", "c", "c"),
        ([], {"c": (10.0, False)}, "", "", 14.9, "c", "", "c"),
        # ... and leaves when it is over, exactly then
        ([], {"c": (10.0, False)}, "", "", 15.0, "", "", ""),
        # back in session: counted as a holder only (once), not as departed
        ([("c", False)], {"c": (10.0, True)}, "c", "", 11.0, "c", "", ""),
        # back in session without the manifest: gone
        ([], {"c": (10.0, True)}, "c", "", 11.0, "", "", ""),
        # banned while departed: gone
        ([], {"c": (10.0, False)}, "", "c", 11.0, "", "", ""),
    ],
)
def test_membership_table(
    holders: list[tuple[str, bool]], departed: dict[str, tuple[float, bool]], in_session: str, banned: str,
    now: float, peers: str, complete: str, kept: str,
) -> None:
    m = membership(holders, departed, in_session=set(in_session), banned=set(banned), now=now, grace=GRACE)
    assert (m.peers, m.complete, set(m.departed)) == (tuple(peers), tuple(complete), set(kept))


_peer = st.sampled_from("abcdefgh")


@given(
    holders=st.dictionaries(_peer, st.booleans()),
    departed=st.dictionaries(_peer, st.tuples(st.floats(0, 100), st.booleans())),
    others=st.sets(_peer),
    banned=st.sets(_peer),
    now=st.floats(0, 200),
)
def test_membership_properties(
    holders: dict[str, bool], departed: dict[str, tuple[float, bool]], others: set[str], banned: set[str], now: float
) -> None:
    in_session = set(holders) | others
    m = membership(holders.items(), departed, in_session=in_session, banned=banned, now=now, grace=GRACE)
    members = m.peers + m.complete
    assert len(members) == len(set(members)), "a peer counted twice"
    assert not set(members) & banned
    for p in members:
        assert p in holders or (p in m.departed and now - departed[p][0] < GRACE)
    assert set(m.departed) <= set(departed) - in_session
    # Applying it again (same now) changes nothing: the kept departed are exactly those still due.
    again = membership(holders.items(), m.departed, in_session=in_session, banned=banned, now=now, grace=GRACE)
    assert again == m


# -- choking ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interested", "served", "slots", "expected"),
    [
        ("abc", {}, 8, "abc"),
        ("abc", {}, 2, "ab"),  # ties by id
        ("abc", {"a": 10, "b": 5}, 2, "bc"),  # least served first
        ("abcd", {"a": 1, "b": 1, "c": 0, "d": 9}, 3, "abc"),
        ("", {}, 4, ""),
        ("ab", {}, 0, ""),
        ("ab", {}, -1, ""),
    ],
)
def test_choose_unchoked_table(interested: str, served: dict[str, int], slots: int, expected: str) -> None:
    assert choose_unchoked(list(interested), served, slots) == set(expected)


@given(st.sets(_peer), st.dictionaries(_peer, st.integers(0, 10**9)), st.integers(0, 10))
def test_choking_is_max_min_fair(interested: set[str], served: dict[str, int], slots: int) -> None:
    keep = choose_unchoked(interested, served, slots)
    assert keep <= interested and len(keep) == min(slots, len(interested))
    # Nobody left choked was served less than someone unchoked.
    for p in interested - keep:
        assert all(served.get(p, 0) >= served.get(q, 0) for q in keep)


# -- first-copy ownership ---------------------------------------------------------------

SIZE = 100


def _never(i: int) -> bool:
    return False


def test_alone_every_piece_is_mine() -> None:
    fc = FirstCopy("me", [SIZE] * 16)
    assert all(fc.owner(i) == "me" and fc.mirror_may_take(i, 0.0) for i in range(16))
    assert not fc.set_members([], 0.0)


@pytest.mark.parametrize("n_members", [1, 2, 3, 7])
def test_shares_are_even_and_all_agree(n_members: int) -> None:
    ids = ["me", *(f"p{k}" for k in range(n_members))]
    views = {}
    for me in ids:
        fc = FirstCopy(me, [SIZE] * 97)
        fc.set_members([p for p in ids if p != me], 0.0)
        views[me] = [fc.owner(i) for i in range(97)]
    assert len({tuple(v) for v in views.values()}) == 1, "nodes that see the same members disagree"
    owners = views["me"]
    cap = -(-97 // len(ids))
    assert max(owners.count(p) for p in ids) <= cap


def test_stale_owner_exact_time() -> None:
    fc = FirstCopy("me", [SIZE] * 8, owner_timeout=20.0)
    fc.set_members(["a"], now=10.0)
    theirs = [i for i in range(8) if fc.owner(i) == "a"]
    assert theirs and not fc.mirror_may_take(theirs[0], 29.999)
    assert fc.mirror_may_take(theirs[0], 30.0)
    assert fc.progress("a", theirs[0], 25.0, wanted=True)  # a new Have: a while longer
    fc.piece_done(theirs[0])  # ... and the piece it advertised arrived
    assert not fc.mirror_may_take(theirs[1], 44.9) and fc.mirror_may_take(theirs[1], 45.0)
    assert fc.deadlines(theirs) == [45.0]


@pytest.mark.parametrize(("peer", "keeps"), [("zz", "me"), ("aa", "aa")])
def test_both_claimed_the_smaller_id_keeps_it(peer: str, keeps: str) -> None:
    fc = FirstCopy("me", [SIZE] * 4)
    fc.set_members([peer], 0.0)
    fc.claim_mine(0)
    fc.peer_claims(peer, [0], done=_never, requested=lambda i: True)
    assert fc.owner(0) == keeps


def test_claims_are_capped_and_dropped_with_their_member() -> None:
    fc = FirstCopy("me", [SIZE] * 200)
    fc.set_members(["a"], 0.0)
    assert fc.peer_claims("a", range(200), done=_never, requested=_never)
    assert sum(fc.owner(i) == "a" for i in range(200)) >= MAX_PEER_CLAIMS
    claimed = [i for i in range(MAX_PEER_CLAIMS + 10) if fc.owner(i) == "a"]
    assert not fc.peer_claims("stranger", [0], done=_never, requested=_never)
    fc.set_members([], 1.0)  # a left: its claims go with it
    assert all(fc.owner(i) == "me" for i in claimed)


@settings(max_examples=60)
@given(
    members=st.lists(st.sets(st.sampled_from("abcdef")), min_size=1, max_size=6),
    claims=st.lists(st.tuples(st.sampled_from("abcdef"), st.lists(st.integers(-2, 40), max_size=80)), max_size=6),
)
def test_ownership_properties(members: list[set[str]], claims: list[tuple[str, list[int]]]) -> None:
    fc = FirstCopy("me", [SIZE] * 37)
    for t, ms in enumerate(members):
        fc.set_members(ms, float(t))
        for peer, idx in claims:
            fc.peer_claims(peer, idx, done=_never, requested=_never)
        current = fc.members()
        assert current == ms - {"me"}
        for i in range(37):
            assert fc.owner(i) in current | {"me"}
        for p in current:
            assert len(fc.claims(p)) <= MAX_PEER_CLAIMS


# -- fake members: Haves that never turn into pieces (issue 11, item 3) -----------


def test_a_repeated_have_is_no_progress() -> None:
    fc = FirstCopy("me", [SIZE] * 8, owner_timeout=20.0)
    fc.set_members(["a"], now=0.0)
    theirs = [i for i in range(8) if fc.owner(i) == "a"]
    assert fc.progress("a", theirs[0], 5.0, wanted=True)
    assert not fc.progress("a", theirs[0], 15.0, wanted=True)  # the same Have again
    assert not fc.progress("a", 99, 15.0, wanted=True)  # out of range
    assert not fc.progress("stranger", theirs[0], 15.0, wanted=True)  # not a member
    assert fc.mirror_may_take(theirs[1], 25.0)  # stale 20 s after its one real Have


def test_a_have_for_a_piece_we_hold_is_no_progress() -> None:
    """Echoing our own Haves (pieces we already hold) keeps nothing from the mirror."""
    fc = FirstCopy("me", [SIZE] * 8, owner_timeout=20.0)
    fc.set_members(["a"], now=0.0)
    theirs = [i for i in range(8) if fc.owner(i) == "a"]
    assert not fc.progress("a", 0, 15.0, wanted=False)
    assert fc.mirror_may_take(theirs[0], 20.0)


def test_an_advertised_piece_that_never_arrives_makes_its_owner_stale() -> None:
    fc = FirstCopy("me", [SIZE] * 8, owner_timeout=20.0, deliver_timeout=10.0)
    fc.set_members(["a"], now=0.0)
    theirs = [i for i in range(8) if fc.owner(i) == "a"]
    for k, t in enumerate((1.0, 5.0, 9.0)):  # fresh Haves, none delivered
        assert fc.progress("a", theirs[k], t, wanted=True)
    assert not fc.mirror_may_take(theirs[-1], 10.999)
    assert fc.mirror_may_take(theirs[-1], 11.0)  # the first one is overdue
    assert fc.deadlines(theirs) == [11.0]
    fc.piece_done(theirs[0])  # late: a broken promise stays broken while a is a member
    assert fc.progress("a", theirs[3], 12.0, wanted=True) is True
    assert fc.mirror_may_take(theirs[-1], 12.0)
    fc.set_members([], 13.0)
    fc.set_members(["a"], 14.0)  # a new membership starts afresh
    assert not fc.mirror_may_take(theirs[-1], 14.0)


def test_a_delivered_promise_keeps_the_owner() -> None:
    fc = FirstCopy("me", [SIZE] * 8, owner_timeout=20.0, deliver_timeout=10.0)
    fc.set_members(["a"], now=0.0)
    theirs = [i for i in range(8) if fc.owner(i) == "a"]
    assert fc.progress("a", theirs[0], 1.0, wanted=True)
    fc.piece_done(theirs[0])  # arrived in time
    assert not fc.mirror_may_take(theirs[1], 20.9) and fc.mirror_may_take(theirs[1], 21.0)


@dataclass
class _Fake:
    """A member that claims, advertises and never delivers (it never unchokes us: it is no source)."""

    name: str
    period: float  # seconds between rounds of lies
    fresh: bool  # each round also names a piece it never named before
    claims: bool  # each round claims MAX_PEER_CLAIMS pieces


def _simulate(n: int, fakes: list[_Fake], horizon: float, mirror_latency: float = 1.0) -> float | None:
    """One node and its fake members; the mirror serves one run at a time. When every piece is here (None: never)."""
    pp = PiecePicker([SIZE] * n, mirror_overlap_budget=0, me="me", owner_timeout=20.0)
    pp.set_swarm([f.name for f in fakes], now=0.0)
    pp.add_source("m", MIRROR)
    in_flight: list[int] = []
    due = 0.0
    next_lie = {f.name: 0.0 for f in fakes}
    named: dict[str, int] = {f.name: 0 for f in fakes}
    t = 0.0
    while t <= horizon:
        for f in fakes:
            if t < next_lie[f.name]:
                continue
            next_lie[f.name] = t + f.period
            mine = [i for i in range(n) if pp.owner(i) == f.name and pp.state(i) != PieceState.DONE]
            if mine:
                pp.peer_progress(f.name, mine[0], t)  # the same Have as last time, or a first one
            if f.fresh:
                while named[f.name] < n and pp.state(named[f.name]) == PieceState.DONE:
                    named[f.name] += 1
                if named[f.name] < n:
                    pp.peer_progress(f.name, named[f.name], t)
                    named[f.name] += 1
            if f.claims:
                pp.peer_claims(f.name, [i for i in range(n) if pp.state(i) != PieceState.DONE][:MAX_PEER_CLAIMS])
        if in_flight and t >= due:
            for i in in_flight:
                pp.piece_written("m", i)
                pp.piece_done(i)
            in_flight = []
        if not in_flight:
            in_flight = pp.pick("m", 8 * SIZE, t)
            due = t + mirror_latency
        pp.check_invariant()
        if all(pp.state(i) == PieceState.DONE for i in range(n)):
            return t
        t += 1.0
    return None


# The bound the docs state: a liar keeps its share for at most owner_timeout +
# deliver_timeout (40 s) after it joins; after that the mirror gets every
# piece whose advertised promise is overdue. One node alone with a 1 s mirror
# round trip per 8 pieces needs n / 8 s; fakes may add their delay on top.
@pytest.mark.parametrize("k", [1, 3, 9])
@pytest.mark.parametrize(
    ("fresh", "claims"), [(False, False), (False, True), (True, False), (True, True)]
)
def test_fake_members_cannot_keep_pieces_off_the_mirror(k: int, fresh: bool, claims: bool) -> None:
    n = 256
    fakes = [_Fake(f"fake{j}", 15.0, fresh, claims) for j in range(k)]
    done = _simulate(n, fakes, horizon=3600.0)
    assert done is not None, "pieces never reached the mirror"
    assert done <= 40.0 + 2 * n / 8, done


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(8, 160),
    fakes=st.lists(
        st.tuples(st.floats(1.0, 19.0), st.booleans(), st.booleans()), min_size=1, max_size=9
    ),
)
def test_fake_members_hypothesis(n: int, fakes: list[tuple[float, bool, bool]]) -> None:
    members = [_Fake(f"f{j}", p, fresh, claims) for j, (p, fresh, claims) in enumerate(fakes)]
    done = _simulate(n, members, horizon=3600.0)
    assert done is not None and done <= 40.0 + 2 * n / 8 + 2, done
