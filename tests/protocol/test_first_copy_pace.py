"""First-copy timers that follow the swarm's pace (protocol/_ownership.py ``pace_scale``, ``FirstCopy.scale``).

Slow owners keep their pieces while the swarm's owners are that slow; an
owner silent far longer than every other owner took, or one that leaves,
loses them; nothing keeps a piece off the mirror longer than ``max_scale``
times the fixed timers.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.protocol._ownership import MAX_SCALE, PACE_FACTOR, FirstCopy, pace_scale

SIZE = 100
T = 20.0  # owner_timeout


@pytest.mark.parametrize(
    ("gaps", "shown", "owners", "expected"),
    [
        ([], 0, 0, 1.0),  # no other owner: nothing to wait for
        ([], 0, 3, 1.0),  # nobody has shown a first copy yet: nothing says waiting helps
        ([5.0], 1, 3, MAX_SCALE),  # one has, two not yet: the pace is unknown
        ([1.0, 2.0], 2, 3, MAX_SCALE),  # one owner still silent: the slow tail is unknown
        ([1.0, 2.0, 3.0], 3, 3, 1.0),  # everyone showed within 3 s: 4 x 3 s < 20 s, the floor
        ([1.0, 2.0, 10.0], 3, 3, PACE_FACTOR * 10.0 / T),  # the slowest showed after 10 s: 40 s
        ([1.0, 2.0, 300.0], 3, 3, MAX_SCALE),  # never beyond max_scale
    ],
)
def test_pace_scale_table(gaps: list[float], shown: int, owners: int, expected: float) -> None:
    assert pace_scale(gaps, shown, owners, T) == pytest.approx(expected)


@settings(max_examples=200)
@given(
    gaps=st.lists(st.floats(0.0, 1e4), max_size=70),
    owners=st.integers(0, 50),
    shown=st.integers(0, 50),
    more=st.floats(0.0, 1e4),
)
def test_pace_scale_is_bounded_and_grows_with_the_gaps(gaps: list[float], owners: int, shown: int, more: float) -> None:
    shown = min(shown, owners)
    k = pace_scale(gaps, shown, owners, T)
    assert 1.0 <= k <= MAX_SCALE
    assert pace_scale([*gaps, more], shown, owners, T) >= k or not gaps or shown < owners
    if owners and 0 < shown < owners:
        assert k == MAX_SCALE
    if shown == 0:
        assert k == 1.0


def _swarm(n: int = 30) -> tuple[FirstCopy, dict[str, list[int]]]:
    fc = FirstCopy("me", [SIZE] * n, owner_timeout=T)
    fc.set_members(["a", "b", "c"], 0.0)
    return fc, {p: [i for i in range(n) if fc.owner(i) == p] for p in ("a", "b", "c")}


def test_a_slow_owner_keeps_its_pieces_while_the_swarm_waits_for_it() -> None:
    """a and b show a first copy within 5 s; c (an edge device) only after 70 s: nobody takes c's pieces."""
    fc, own = _swarm()
    assert fc.progress("a", own["a"][0], 3.0, wanted=True)
    assert fc.progress("b", own["b"][0], 5.0, wanted=True)
    for t in (20.0, 40.0, 69.9):  # the fixed rule made c stale at 20 s
        assert not fc.mirror_may_take(own["c"][0], t), t
    assert fc.progress("c", own["c"][0], 70.0, wanted=True)
    assert fc.scale() == MAX_SCALE  # 4 x 70 s, capped at 8 x 20 s
    assert not fc.mirror_may_take(own["c"][1], 70.0 + MAX_SCALE * T - 0.1)
    assert fc.mirror_may_take(own["c"][1], 70.0 + MAX_SCALE * T)


def test_a_silent_owner_waits_at_most_max_scale_times_owner_timeout() -> None:
    """A member that never shows anything (dead but still in session, or a fake) is stale after 160 s."""
    fc, own = _swarm()
    fc.progress("a", own["a"][0], 1.0, wanted=True)
    fc.progress("b", own["b"][0], 1.0, wanted=True)
    assert not fc.mirror_may_take(own["c"][0], MAX_SCALE * T - 0.1)
    assert fc.mirror_may_take(own["c"][0], MAX_SCALE * T)
    assert MAX_SCALE * T in fc.deadlines(own["c"])


def test_in_a_fast_swarm_an_owner_that_stops_is_stale_after_owner_timeout() -> None:
    """Every owner showed within 2 s: the pace gives the fixed 20 s, so an owner that stops loses its share then."""
    fc, own = _swarm()
    for p in ("a", "b", "c"):
        assert fc.progress(p, own[p][0], 2.0, wanted=True)
        fc.piece_done(own[p][0])
    assert fc.scale() == 1.0
    fc.progress("a", own["b"][1], 10.0, wanted=True)  # Haves of others' pieces: progress, not a first copy
    fc.progress("b", own["a"][1], 10.0, wanted=True)
    assert fc.scale() == 1.0
    assert not fc.mirror_may_take(own["c"][1], 21.9)
    assert fc.mirror_may_take(own["c"][1], 22.0)  # c went quiet at 2 s
    assert not fc.mirror_may_take(own["a"][2], 29.9)


def test_an_owner_that_leaves_loses_its_pieces_at_once() -> None:
    """Dead, not slow: its session (or its gossiped membership) ends, and its share moves with the membership."""
    fc, own = _swarm()
    fc.set_members(["a", "b"], 5.0)
    assert all(fc.owner(i) != "c" for i in own["c"])
    assert any(fc.mirror_may_take(i, 5.0) for i in own["c"])  # some of c's pieces are ours now


def test_signs_of_life_keep_a_slow_owner_but_not_past_max_scale() -> None:
    """Haves for pieces we hold (it is receiving) are no progress, only life: its share stays at most 8 x 20 s."""
    fc, own = _swarm()
    fc.progress("a", own["a"][0], 1.0, wanted=True)
    fc.progress("b", own["b"][0], 1.0, wanted=True)
    fc.progress("c", own["c"][0], 1.0, wanted=True)
    for p in ("a", "b", "c"):
        fc.piece_done(own[p][0])
    assert fc.scale() == 1.0
    held = [i for i in range(30) if i not in own["c"]]
    for i, t in zip(held, range(10, 200, 10), strict=False):  # c echoes pieces we hold every 10 s
        assert not fc.progress("c", i, float(t), wanted=False)
    assert not fc.mirror_may_take(own["c"][1], 100.0)  # the fixed rule: stale at 21 s
    assert not fc.mirror_may_take(own["c"][1], 1.0 + MAX_SCALE * T - 0.1)
    assert fc.mirror_may_take(own["c"][1], 1.0 + MAX_SCALE * T)


def test_slow_requests_stretch_the_promise() -> None:
    """Our own peer requests take ~30 s to be served (a slow downlink): a promise waits 4 x that, not 20 s."""
    fc, own = _swarm(64)
    mine = next(i for i in range(64) if fc.owner(i) == "me")
    for p in ("a", "b", "c"):
        fc.progress(p, own[p][0], 1.0, wanted=True)
    for k, i in enumerate(own["b"][1:4]):  # b's pieces: asked at once, each here 30 s later
        fc.progress("b", i, 2.0 + k, wanted=True)
        fc.requested(i, 2.0 + k)
        fc.mirror_may_take(mine, 32.0 + k)  # the clock moves on (calls give the time)
        fc.piece_done(i)
    for p in ("a", "b", "c"):
        fc.piece_done(own[p][0])
    assert fc.scale() == 1.0
    asked = own["c"][1]
    assert fc.progress("a", asked, 40.0, wanted=True)  # a has c's piece: a promise, asked for at once
    fc.requested(asked, 40.0)
    others = own["b"][4:] + own["c"][2:]
    for i, t in zip(others, range(50, 200, 10), strict=False):  # ... keeps advertising (others' pieces)
        fc.progress("a", i, float(t), wanted=True)
    assert fc.scale() == 1.0
    assert not fc.mirror_may_take(own["a"][2], 40.0 + PACE_FACTOR * 30.0 - 0.1)  # the fixed rule: at 60 s
    assert fc.mirror_may_take(own["a"][2], 40.0 + PACE_FACTOR * 30.0)


@settings(max_examples=60, deadline=None)
@given(
    shows=st.lists(st.tuples(st.sampled_from("abc"), st.floats(0.0, 400.0)), max_size=12),
    probe=st.floats(0.0, 600.0),
)
def test_an_owner_is_never_stale_early_and_always_stale_by_max_scale(shows: list[tuple[str, float]], probe: float) -> None:
    """Whatever the others do: an owner is not stale within owner_timeout of its last first copy,
    and is stale max_scale x owner_timeout after it (it sends nothing more, holds no promise)."""
    fc, own = _swarm(60)
    last = dict.fromkeys("abc", 0.0)
    used = dict.fromkeys("abc", 0)
    for p, t in sorted(shows, key=lambda x: x[1]):
        if used[p] + 1 >= len(own[p]):
            continue
        i = own[p][used[p]]
        used[p] += 1
        fc.progress(p, i, t, wanted=True)
        fc.piece_done(i)  # delivered: no promise outstanding
        last[p] = t
    now = max([probe, *last.values()])
    for p in "abc":
        i = own[p][-1]  # never advertised
        if now < last[p] + T:
            assert not fc.mirror_may_take(i, now), (p, now)
        if now >= last[p] + MAX_SCALE * T:
            assert fc.mirror_may_take(i, now), (p, now)


def test_a_complete_holder_that_serves_us_counts_as_shown() -> None:
    """A seed sends no Haves (it has every piece); once it delivers a piece, the pace no longer waits for it."""
    fc, own = _swarm()
    for p in ("a", "b"):
        fc.progress(p, own[p][0], 2.0, wanted=True)
    assert fc.scale() == MAX_SCALE  # c (complete) has shown nothing yet
    fc.delivered("peer:c", own["a"][1])
    assert fc.scale() == 1.0
    fc.delivered("peer:stranger", own["a"][2])  # not a member: nothing
    assert fc.scale() == 1.0


def test_a_lone_silent_member_gets_the_fixed_timers() -> None:
    """No owner has shown anything (a liar alone with us, tests/swarm: claims everything, never unchokes):
    nothing says the swarm moves, so its share is the mirror's after owner_timeout, not 8 x that."""
    fc = FirstCopy("me", [SIZE] * 16, owner_timeout=T)
    fc.set_members(["liar"], 0.0)
    theirs = [i for i in range(16) if fc.owner(i) == "liar"]
    assert fc.scale() == 1.0
    assert not fc.mirror_may_take(theirs[0], T - 0.1)
    assert fc.mirror_may_take(theirs[0], T)
