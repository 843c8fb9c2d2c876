"""The swarm's pure policies: membership, choking, first-copy ownership. Tables and Hypothesis; time is a parameter."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.protocol._choking import choose_unchoked
from autoglm.protocol._membership import membership
from autoglm.protocol._ownership import MAX_PEER_CLAIMS, MAX_SCALE, FirstCopy
from autoglm.protocol._picker import MIRROR, PEER, PiecePicker, PieceState

# -- membership ------------------------------------------------------------------

GRACE = 5.0


@pytest.mark.parametrize(
    ("holders", "departed", "banned", "now", "peers", "complete", "kept"),
    [
        # fetching and complete holders, split
        ([("a", False), ("b", True)], {}, "", 0.0, "a", "b", ""),
        # a banned holder is no member
        ([("a", False), ("b", False)], {}, "b", 0.0, "a", "", ""),
        # a departed peer stays, as it was, within the grace ...
        ([], {"c": (10.0, True)}, "", 14.9, "", "c", "c"),
        ([], {"c": (10.0, False)}, "", 14.9, "c", "", "c"),
        # ... and leaves when it is over, exactly then
        ([], {"c": (10.0, False)}, "", 15.0, "", "", ""),
        # announced again on a new session: counted as a holder only (once), not as departed
        ([("c", False)], {"c": (10.0, True)}, "", 11.0, "c", "", ""),
        # banned while departed: gone
        ([], {"c": (10.0, False)}, "c", 11.0, "", "", ""),
    ],
)
def test_membership_table(
    holders: list[tuple[str, bool]], departed: dict[str, tuple[float, bool]], banned: str,
    now: float, peers: str, complete: str, kept: str,
) -> None:
    m = membership(holders, departed, banned=set(banned), now=now, grace=GRACE)
    assert (m.peers, m.complete, set(m.departed)) == (tuple(peers), tuple(complete), set(kept))


_peer = st.sampled_from("abcdefgh")


@given(
    holders=st.dictionaries(_peer, st.booleans()),
    departed=st.dictionaries(_peer, st.tuples(st.floats(0, 100), st.booleans())),
    banned=st.sets(_peer),
    now=st.floats(0, 200),
)
def test_membership_properties(
    holders: dict[str, bool], departed: dict[str, tuple[float, bool]], banned: set[str], now: float
) -> None:
    m = membership(holders.items(), departed, banned=banned, now=now, grace=GRACE)
    members = m.peers + m.complete
    assert len(members) == len(set(members)), "a peer counted twice"
    assert not set(members) & banned
    for p in members:
        assert p in holders or (p in m.departed and now - departed[p][0] < GRACE)
    assert set(m.departed) <= set(departed) - set(holders)
    # Applying it again (same now) changes nothing: the kept departed are exactly those still due.
    again = membership(holders.items(), m.departed, banned=banned, now=now, grace=GRACE)
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
    fc = FirstCopy("me", [SIZE] * 8, owner_timeout=20.0, max_scale=1.0)
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
    fc = FirstCopy("me", [SIZE] * 8, owner_timeout=20.0, max_scale=1.0)
    fc.set_members(["a"], now=0.0)
    theirs = [i for i in range(8) if fc.owner(i) == "a"]
    assert fc.progress("a", theirs[0], 5.0, wanted=True)
    assert not fc.progress("a", theirs[0], 15.0, wanted=True)  # the same Have again
    assert not fc.progress("a", 99, 15.0, wanted=True)  # out of range
    assert not fc.progress("stranger", theirs[0], 15.0, wanted=True)  # not a member
    assert fc.mirror_may_take(theirs[1], 25.0)  # stale 20 s after its one real Have


def test_a_have_for_a_piece_we_hold_is_no_progress() -> None:
    """Echoing our own Haves (pieces we already hold) keeps nothing from the mirror."""
    fc = FirstCopy("me", [SIZE] * 8, owner_timeout=20.0, max_scale=1.0)
    fc.set_members(["a"], now=0.0)
    theirs = [i for i in range(8) if fc.owner(i) == "a"]
    assert not fc.progress("a", 0, 15.0, wanted=False)
    assert fc.mirror_may_take(theirs[0], 20.0)


def test_an_advertised_piece_that_never_arrives_makes_its_owner_stale() -> None:
    fc = FirstCopy("me", [SIZE] * 8, owner_timeout=20.0, deliver_timeout=10.0, max_scale=1.0)
    fc.set_members(["a"], now=0.0)
    theirs = [i for i in range(8) if fc.owner(i) == "a"]
    for k, t in enumerate((1.0, 5.0, 9.0)):  # fresh Haves, each requested at once, none delivered
        assert fc.progress("a", theirs[k], t, wanted=True)
        fc.requested(theirs[k], t)
    assert not fc.mirror_may_take(theirs[-1], 10.999)
    assert fc.mirror_may_take(theirs[-1], 11.0)  # the first one is overdue
    assert fc.deadlines(theirs) == [11.0]
    fc.piece_done(theirs[0])  # late: a broken promise stays broken while a is a member
    assert fc.progress("a", theirs[3], 12.0, wanted=True) is True
    assert fc.mirror_may_take(theirs[-1], 12.0)
    fc.set_members([], 13.0)
    fc.set_members(["a"], 14.0)  # a new membership starts afresh
    assert not fc.mirror_may_take(theirs[-1], 14.0)


def test_a_promise_we_never_get_to_request_breaks_after_unrequested_timeout() -> None:
    """A member that advertises and chokes us: no request ever starts the clock, the Have does (3 x deliver_timeout)."""
    fc = FirstCopy("me", [SIZE] * 64, owner_timeout=20.0, deliver_timeout=10.0, max_scale=1.0)
    fc.set_members(["a"], now=0.0)
    theirs = [i for i in range(64) if fc.owner(i) == "a"]
    for k in range(5):  # a fresh Have every 8 s keeps owner_timeout away
        assert fc.progress("a", theirs[k], 1.0 + 8 * k, wanted=True)
    assert fc.deadlines(theirs) == [31.0]
    assert not fc.mirror_may_take(theirs[-1], 30.999) and fc.mirror_may_take(theirs[-1], 31.0)


def test_a_request_before_the_have_does_not_shorten_the_promise() -> None:
    """We asked another holder for the piece before its owner advertised it: the owner's clock starts at its Have."""
    fc = FirstCopy("me", [SIZE] * 8, owner_timeout=20.0, deliver_timeout=10.0, max_scale=1.0)
    fc.set_members(["a"], now=0.0)
    theirs = [i for i in range(8) if fc.owner(i) == "a"]
    fc.requested(theirs[0], 1.0)
    assert fc.progress("a", theirs[0], 5.0, wanted=True)
    assert fc.deadlines(theirs) == [15.0]


# Under load (16 nodes on 2 cores) an honest owner's Have can wait for our
# request slots far longer than the piece then takes to arrive. Replayed at
# the picker: each row is (time, event, which of a's pieces). The owner's
# other pieces must stay off the mirror throughout when every piece arrives
# within deliver_timeout of our request; an owner that lets a requested piece
# sit is stale exactly deliver_timeout after the request.
_HONEST_BUT_QUEUED = [
    (10.0, "have", 0), (22.0, "have", 1), (34.0, "have", 2),
    (35.0, "request", 0),  # our slots were busy until now
    (40.0, "arrive", 0),
    (41.0, "request", 1), (45.0, "arrive", 1),
    (46.0, "have", 3), (47.0, "request", 2), (52.0, "arrive", 2),
]
_REQUESTED_NEVER_SENT = [
    (10.0, "have", 0), (22.0, "have", 1), (34.0, "have", 2),
    (35.0, "request", 0),  # ... and it never comes: due at 55
    (46.0, "have", 3),
]


@pytest.mark.parametrize(("events", "stale_from"), [(_HONEST_BUT_QUEUED, None), (_REQUESTED_NEVER_SENT, 55.0)])
def test_the_promise_runs_from_our_request_not_from_the_have(
    events: list[tuple[float, str, int]], stale_from: float | None
) -> None:
    n = 16
    fc = FirstCopy("me", [SIZE] * n, owner_timeout=20.0, max_scale=1.0)  # the fixed timers: exact times
    pp = PiecePicker([SIZE] * n, mirror_overlap_budget=0, first_copy=fc)
    fc.set_members(["a"], now=0.0)
    pp.add_source("a", PEER, have=())
    theirs = [i for i in range(n) if fc.owner(i) == "a"]
    probe = theirs[-1]  # a piece a never advertised: the mirror's only if a is stale
    steps = iter(events)
    step = next(steps, None)
    t = 0.0
    while t <= 60.0:
        while step is not None and step[0] <= t:
            _, what, k = step
            i = theirs[k]
            if what == "have":
                pp.source_have("a", i)
                assert fc.progress("a", i, t, wanted=pp.wants(i))
            elif what == "request":
                assert pp.pick("a", SIZE, t) == [i]
            else:
                pp.piece_written("a", i)
                pp.piece_done(i)
            step = next(steps, None)
        expect = stale_from is not None and t >= stale_from
        assert fc.mirror_may_take(probe, t) is expect, t
        t += 0.5


def test_a_delivered_promise_keeps_the_owner() -> None:
    fc = FirstCopy("me", [SIZE] * 8, owner_timeout=20.0, deliver_timeout=10.0, max_scale=1.0)
    fc.set_members(["a"], now=0.0)
    theirs = [i for i in range(8) if fc.owner(i) == "a"]
    assert fc.progress("a", theirs[0], 1.0, wanted=True)
    fc.piece_done(theirs[0])  # arrived in time
    assert not fc.mirror_may_take(theirs[1], 20.9) and fc.mirror_may_take(theirs[1], 21.0)


@dataclass
class _Fake:
    """A member that claims, advertises and never delivers."""

    name: str
    period: float  # seconds between rounds of lies
    fresh: bool  # each round also names a piece it never named before
    claims: bool  # each round claims MAX_PEER_CLAIMS pieces
    unchokes: bool = False  # it unchokes us (a source we request from), then never sends: requests stall


STALL = 15.0  # the engine's stall timeout: a request with no bytes this long fails
FAILURES = 8  # the engine drops a source after this many failed requests in a row


def _simulate(n: int, fakes: list[_Fake], horizon: float, mirror_latency: float = 1.0) -> tuple[float | None, float]:
    """One node and its fake members; the mirror serves one run at a time.

    Returns when every piece is here (None: never) and when every piece no
    fake advertised was (their shares).
    """
    fc = FirstCopy("me", [SIZE] * n, owner_timeout=20.0)
    pp = PiecePicker([SIZE] * n, mirror_overlap_budget=0, first_copy=fc)
    fc.set_members([f.name for f in fakes], now=0.0)
    pp.add_source("m", MIRROR)
    for f in fakes:
        if f.unchokes:
            pp.add_source(f.name, PEER, have=())
    asked: dict[str, tuple[list[int], float]] = {}  # fake -> (pieces requested of it, when)
    failures = dict.fromkeys((f.name for f in fakes), 0)
    in_flight: list[int] = []
    due = 0.0
    next_lie = {f.name: 0.0 for f in fakes}
    named: dict[str, int] = {f.name: 0 for f in fakes}
    advertised: set[int] = set()
    shares_done: float | None = None
    t = 0.0

    def have(f: _Fake, i: int) -> None:
        advertised.add(i)
        if pp.has_source(f.name):
            pp.source_have(f.name, i)
        fc.progress(f.name, i, t, wanted=pp.wants(i))

    while t <= horizon:
        for f in fakes:
            if t < next_lie[f.name]:
                continue
            next_lie[f.name] = t + f.period
            mine = [i for i in range(n) if fc.owner(i) == f.name and pp.state(i) != PieceState.DONE]
            if mine:
                have(f, mine[0])  # the same Have as last time, or a first one
            if f.fresh:
                while named[f.name] < n and pp.state(named[f.name]) == PieceState.DONE:
                    named[f.name] += 1
                if named[f.name] < n:
                    have(f, named[f.name])
                    named[f.name] += 1
            if f.claims:
                fc.peer_claims(f.name, [i for i in range(n) if pp.state(i) != PieceState.DONE][:MAX_PEER_CLAIMS],
                               done=pp.done, requested=pp.taken)
        for f in fakes:  # requests of an unchoking liar stall, fail, and are asked again
            if not f.unchokes:
                continue
            if not pp.has_source(f.name):
                continue
            pieces, since = asked.get(f.name, ([], t))
            if pieces and t - since >= STALL:
                for i in pieces:
                    pp.piece_failed(f.name, i, integrity=False)
                pieces = []
                failures[f.name] += 1
                if failures[f.name] >= FAILURES:
                    pp.remove_source(f.name)
                    continue
            if not pieces:
                asked[f.name] = (pp.pick(f.name, 8 * SIZE, t), t)
        if in_flight and t >= due:
            for i in in_flight:
                pp.piece_written("m", i)
                pp.piece_done(i)
            in_flight = []
        if not in_flight:
            in_flight = pp.pick("m", 8 * SIZE, t)
            due = t + mirror_latency
        pp.check_invariant()
        if shares_done is None and all(pp.state(i) == PieceState.DONE for i in range(n) if i not in advertised):
            shares_done = t
        if all(pp.state(i) == PieceState.DONE for i in range(n)):
            return t, shares_done or t
        t += 1.0
    return None, shares_done or t


# The bounds the docs state (protocol/_ownership.py, docs/security.md): a liar
# keeps its share off the mirror for at most owner_timeout + deliver_timeout
# (40 s) after it joins when it unchokes us (we request its pieces at once),
# and owner_timeout + unrequested_timeout (80 s) when it never does. One node
# alone with a 1 s mirror round trip per 8 pieces needs n / 8 s; fakes may add
# their delay on top. The pieces an unchoking liar advertised stay with it as
# a source until the engine drops it (FAILURES stalled requests in a row):
# bounded, not by the first-copy rule.
#
# The pace rule (FirstCopy.scale) stretches every timer by up to MAX_SCALE
# while the swarm's owners are slow or silent, and fakes are owners that
# never show a verified piece: the bounds are MAX_SCALE times those.
def _bound(fakes: list[_Fake]) -> float:
    return (40.0 if all(f.unchokes for f in fakes) else 80.0) * MAX_SCALE


@pytest.mark.parametrize("k", [1, 3, 9])
@pytest.mark.parametrize(
    ("fresh", "claims", "unchokes"),
    [(False, False, False), (False, True, False), (True, False, False), (True, True, False),
     (True, False, True), (True, True, True)],
)
def test_fake_members_cannot_keep_pieces_off_the_mirror(k: int, fresh: bool, claims: bool, unchokes: bool) -> None:
    n = 256
    fakes = [_Fake(f"fake{j}", 15.0, fresh, claims, unchokes) for j in range(k)]
    done, shares = _simulate(n, fakes, horizon=3600.0)
    assert done is not None, "pieces never reached the mirror"
    assert shares <= _bound(fakes) + 2 * n / 8, shares
    if not unchokes:
        assert done <= _bound(fakes) + 2 * n / 8, done


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(8, 160),
    fakes=st.lists(
        st.tuples(st.floats(1.0, 19.0), st.booleans(), st.booleans(), st.booleans()), min_size=1, max_size=9
    ),
)
def test_fake_members_hypothesis(n: int, fakes: list[tuple[float, bool, bool, bool]]) -> None:
    members = [_Fake(f"f{j}", p, fresh, claims, unchokes) for j, (p, fresh, claims, unchokes) in enumerate(fakes)]
    done, shares = _simulate(n, members, horizon=3600.0)
    assert done is not None and shares <= _bound(members) + 2 * n / 8 + 2, (done, shares)
