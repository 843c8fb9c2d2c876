"""The picker's endgame (protocol/_picker.py rule 4, protocol/_requests.py): a duplicate only for a late request, to a sooner source.

Each scenario measures piece times the way a fetch does: ``pick`` at one
instant, ``piece_written(..., now=)`` at a later one. Sizes are in bytes and
times in seconds; one piece of ``SIZE`` bytes in 1 s means 1 s per ``SIZE``.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.protocol._picker import MIRROR, PEER, PiecePicker, PieceState, SourceKind
from autoglm.protocol._requests import UNMEASURED_FLOOR, UNMEASURED_HORIZON

SIZE = 1000


def deliver(pp: PiecePicker, sid: str, at: float, took: float) -> int:
    """Ask ``sid`` for one piece at ``at``; it arrives ``took`` seconds later (a measured piece time)."""
    got = pp.pick(sid, SIZE, at)
    assert len(got) == 1, got
    pp.piece_written(sid, got[0], now=at + took)
    pp.piece_done(got[0])
    return got[0]


def warmed(n: int, times: dict[str, float], *, delay: float = 0.0, late: float = 2.0, kind: SourceKind = PEER,
           sizes: list[int] | None = None) -> PiecePicker:
    """``n`` pieces, every source holding all; each source in ``times`` first delivers one piece in that many seconds."""
    pp = PiecePicker(sizes or [SIZE] * n, endgame_delay=delay, endgame_late=late)
    for sid in times:
        pp.add_source(sid, kind, None if kind is MIRROR else range(n))
    for sid, took in times.items():
        deliver(pp, sid, 0.0, took)
    pp.check_invariant()
    return pp


# -- table: when a duplicate is allowed ------------------------------------------------------------


@pytest.mark.parametrize(
    ("times", "first", "now", "dup_by", "expected"),
    [
        # Pieces take 1 s from either peer: a's request (asked at 10 s) is late after 2 × 1 s (endgame_late 2).
        ({"a": 1.0, "b": 1.0}, "a", 11.5, "b", []),
        ({"a": 1.0, "b": 1.0}, "a", 12.0, "b", [2]),
        # On a slow link (30 s a piece) a request 10 s old is not late: no duplicate, no bytes dropped.
        ({"a": 30.0, "b": 30.0}, "a", 20.0, "b", []),
        ({"a": 30.0, "b": 30.0}, "a", 71.0, "b", [2]),
        # The peers' pieces take 4.5 s (decaying mean of 9.5 s and 0.5 s): late at 19 s. At 19.1 s a is
        # 0.4 s from its own expected finish: b (0.5 s) would not be sooner. At 19.6 s a is overdue.
        ({"a": 9.5, "b": 0.5}, "a", 18.9, "b", []),
        ({"a": 9.5, "b": 0.5}, "a", 19.1, "b", []),
        ({"a": 9.5, "b": 0.5}, "a", 19.6, "b", [2]),
        # b (0.5 s) is overdue at 19.1 s, expected to need as long again as it waited (9.1 s): a needs
        # 9.5 s, not sooner; at 19.6 s it is (9.6 s).
        ({"a": 9.5, "b": 0.5}, "b", 19.1, "a", []),
        ({"a": 9.5, "b": 0.5}, "b", 19.6, "a", [2]),
    ],
)
def test_duplicate_only_when_late_and_sooner(times: dict[str, float], first: str, now: float, dup_by: str,
                                             expected: list[int]) -> None:
    pp = warmed(3, times)
    assert pp.pick(first, SIZE, 10.0) == [2]
    assert pp.pick(dup_by, SIZE, now) == expected
    pp.check_invariant()


def test_a_slow_source_does_not_duplicate_a_fast_one() -> None:
    pp = warmed(4, {"fast": 1.0, "slow": 20.0, "fast2": 1.0})
    assert pp.pick("fast", SIZE, 100.0) == [3]
    # The kind's mean (22 s over 3 pieces: ~7.3 s) makes the request late at ~14.7 s. A source that takes
    # 20 s a piece does not beat one whose own time is 1 s until that request has waited more than 20 s.
    assert pp.pick("slow", SIZE, 115.0) == []
    assert pp.pick("fast2", SIZE, 115.0) == [3]  # a source expected sooner gets it
    pp.cancel("fast2", [3])
    assert pp.pick("slow", SIZE, 120.5) == [3]  # overdue by as long as slow needs: slow is sooner now


def test_large_piece_is_judged_by_its_size() -> None:
    # 1 s per SIZE bytes: a piece of 10 × SIZE is expected to take 10 s, late at 20 s.
    pp = warmed(3, {"a": 1.0, "b": 1.0}, sizes=[SIZE, SIZE, 10 * SIZE])
    assert pp.pick("a", 10 * SIZE, 0.0) == [2]
    assert pp.pick("b", SIZE, 19.0) == []
    assert pp.pick("b", SIZE, 20.0) == [2]


def test_no_piece_measured_keeps_the_fixed_delay() -> None:
    pp = PiecePicker([SIZE] * 2, endgame_delay=1.0)
    for sid in ("a", "b"):
        pp.add_source(sid, PEER, [0, 1])
    assert pp.pick("a", 2 * SIZE, now=10.0) == [0, 1]
    assert pp.pick("b", SIZE, now=10.5) == []
    assert pp.next_deadline(10.5) == 11.0
    assert pp.pick("b", SIZE, now=11.0) == [0]


def test_delay_is_a_floor_under_fast_piece_times() -> None:
    pp = warmed(3, {"a": 0.01, "b": 0.01}, delay=1.0)
    assert pp.pick("a", SIZE, 5.0) == [2]
    assert pp.pick("b", SIZE, 5.5) == []  # late against 10 ms pieces, but younger than endgame_delay
    assert pp.next_deadline(5.5) == 6.0
    assert pp.pick("b", SIZE, 6.0) == [2]


def test_stalled_source_is_rescued() -> None:
    """A source that delivered at 1 s a piece stops mid-piece: another source takes the piece, and the writer cancels the staller."""
    pp = warmed(6, {"a": 1.0, "b": 1.0})
    for k in range(3):  # a keeps delivering, so its own estimate stays at 1 s
        deliver(pp, "a", 1.0 + k, 1.0)
    stuck = pp.pick("a", SIZE, 10.0)
    assert stuck == [5]
    # Nothing to do until the request is late (2 × 1 s), and the engine knows when to look again.
    assert pp.pick("b", SIZE, 11.0) == []
    due = pp.next_deadline(11.0)
    assert due == 12.0
    assert pp.pick("b", SIZE, due) == [5]
    assert pp.requesters(5) == frozenset({"a", "b"})
    assert pp.piece_written("b", 5, now=13.0) == frozenset({"a"})  # the caller cancels a's request
    pp.piece_done(5)
    assert pp.is_complete
    pp.check_invariant()


def test_stalled_mirror_is_rescued_by_a_slower_mirror_in_the_end() -> None:
    # m1 took 1 s a piece, m2 5 s; endgame_late 1: late after the kind's 3.2 s (decaying mean). m1 stalls:
    # m2 may duplicate only once m1's request has waited as long as m2 needs (5 s), not when it turns late.
    pp = warmed(3, {"m1": 1.0, "m2": 5.0}, kind=MIRROR, late=1.0)
    assert pp.pick("m1", SIZE, 0.0) == [2]
    assert pp.next_deadline(0.0) == 1.0  # m1's own expected time: overdue from then on
    assert pp.pick("m2", SIZE, 4.9) == []
    assert pp.next_deadline(4.9) == 5.0
    assert pp.pick("m2", SIZE, 5.0) == [2]


def test_times_of_a_removed_source_are_forgotten() -> None:
    pp = warmed(3, {"a": 1.0, "b": 50.0})
    assert pp.expected_time("b", 0) == pytest.approx(50.0)
    pp.remove_source("b")
    pp.add_source("b", PEER, range(3))
    assert pp.expected_time("b", 0) is None


def test_piece_written_without_now_measures_nothing() -> None:
    pp = PiecePicker([SIZE] * 2)
    pp.add_source("a", PEER, [0, 1])
    got = pp.pick("a", SIZE, 0.0)
    pp.piece_written("a", got[0])
    assert pp.expected_time("a", 0) is None


def test_estimate_follows_a_source_that_got_slower() -> None:
    pp = PiecePicker([SIZE] * 12)
    pp.add_source("a", PEER, range(12))
    t = 0.0
    for _ in range(4):
        deliver(pp, "a", t, 1.0)
        t += 1.0
    for _ in range(6):
        deliver(pp, "a", t, 10.0)
        t += 10.0
    est = pp.expected_time("a", 0)
    assert est is not None and 7.0 < est < 10.0  # older samples weigh less


def test_endgame_late_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="endgame"):
        PiecePicker([SIZE], endgame_late=-1.0)


# -- properties --------------------------------------------------------------------------------------

_took = st.floats(0.05, 50.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    a_times=st.lists(_took, min_size=1, max_size=6),
    b_times=st.lists(_took, min_size=0, max_size=6),
    delay=st.sampled_from([0.0, 1.0]),
    late=st.sampled_from([1.5, 2.0, 3.0]),
)
def test_a_stalled_request_is_always_rescued_in_bounded_time(
    a_times: list[float], b_times: list[float], delay: float, late: float,
) -> None:
    """Whatever the measured piece times, following next_deadline, b duplicates a's stuck piece, never early and never late."""
    n = len(a_times) + len(b_times) + 1
    pp = PiecePicker([SIZE] * n, endgame_delay=delay, endgame_late=late)
    pp.add_source("a", PEER, range(n))
    pp.add_source("b", PEER, range(n))
    t = 0.0
    for took in a_times:
        deliver(pp, "a", t, took)
        t += took
    for took in b_times:
        deliver(pp, "b", t, took)
        t += took
    asked = t + 1.0
    assert pp.pick("a", SIZE, asked) == [n - 1]
    every = a_times + b_times
    # Decaying means lie within the samples' range: late no sooner than late × the fastest sample,
    # and rescued no later than the slowest (lateness, and b's own time once a is overdue).
    earliest = asked + max(delay, late * min(every))
    latest = asked + max(delay, late * max(every), max(b_times, default=0.0), max(a_times)) + 1e-6
    now, wakes = asked, 0
    while not pp.pick("b", SIZE, now):
        due = pp.next_deadline(now)
        assert due is not None and due > now, (due, now)
        now, wakes = due, wakes + 1
        assert wakes < 10 and now <= latest, (now, latest)
    assert earliest - 1e-6 <= now <= latest
    assert pp.requesters(n - 1) == frozenset({"a", "b"})
    pp.check_invariant()


_op = st.tuples(
    st.sampled_from(["pick", "written", "fail", "cancel", "remove", "add", "wait"]),
    st.sampled_from(["m0", "p0", "p1", "p2"]),
    st.integers(0, 5),
    st.floats(0.0, 20.0, allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=80), st.sampled_from([0.0, 1.0]))
def test_random_timed_operations(ops: list[tuple[str, str, int, float]], delay: float) -> None:
    """Bookkeeping stays consistent; a duplicate never comes before endgame_delay; next_deadline is in the future."""
    pp = PiecePicker([SIZE] * 6, endgame_delay=delay)
    present: set[str] = set()

    def add(sid: str) -> None:
        pp.add_source(sid, MIRROR if sid.startswith("m") else PEER, None if sid.startswith("m") else range(6))
        present.add(sid)

    for sid in ("m0", "p0", "p1", "p2"):
        add(sid)
    first_asked: dict[int, float] = {}
    now = 0.0
    for verb, sid, i, dt in ops:
        now += dt
        if verb == "add" and sid not in present:
            add(sid)
        elif sid not in present or verb == "wait":
            pass
        elif verb == "pick":
            before = {j: pp.requesters(j) for j in range(6)}
            for j in pp.pick(sid, SIZE, now):
                if before[j]:  # a duplicate: the piece was requested already
                    assert now - first_asked[j] >= delay - 1e-9
                    assert len(pp.requesters(j)) <= 2
                else:
                    first_asked[j] = now
        elif verb == "written" and i in pp.in_flight(sid):
            pp.piece_written(sid, i, now=now)
            pp.piece_done(i)
        elif verb == "fail" and i in pp.in_flight(sid):
            pp.piece_failed(sid, i, integrity=False)
        elif verb == "cancel":
            pp.cancel(sid, [i] if i in pp.in_flight(sid) else [])
        elif verb == "remove":
            pp.remove_source(sid)
            present.discard(sid)
        for j in range(6):
            if not pp.requesters(j):
                first_asked.pop(j, None)
        due = pp.next_deadline(now)
        assert due is None or due > now
        pp.check_invariant()
    assert all(pp.state(j) in (PieceState.NONE, PieceState.REQUESTED, PieceState.DONE) for j in range(6))


# -- progress: the bytes a request has received so far --------------------------------------------


@pytest.mark.parametrize(
    ("got_by_now", "expected"),
    [
        # b takes 1 s a piece. a's request is late at 12 s (2 × the kind's 1 s; asked at 10 s).
        # At 13 s it has 700 of 1000 bytes: the rest takes 1.3 s at its rate, b needs 1 s: sooner.
        (700, [2]),
        # 800 bytes: 0.75 s left at its rate, b is not sooner (a link shared more widely, still moving).
        (800, []),
        # Nothing for 3 s, or one byte: stalled or trickling, b rescues it.
        (0, [2]),
        (1, [2]),
        # Every byte in (being checked): never duplicated.
        (1000, []),
    ],
)
def test_progress_decides_whether_a_late_request_is_duplicated(got_by_now: int, expected: list[int]) -> None:
    got = {2: got_by_now}
    pp = warmed(3, {"a": 1.0, "b": 1.0})
    pp.progress = lambda i: got.get(i, 0)
    assert pp.pick("a", SIZE, 10.0) == [2]
    assert pp.pick("b", SIZE, 13.0) == expected


def test_a_request_that_stops_moving_is_rescued_when_its_rest_outgrows_the_duplicate() -> None:
    got = {2: 0}
    pp = warmed(3, {"a": 1.0, "b": 1.0})
    pp.progress = lambda i: got[i] if i in got else 0
    assert pp.pick("a", SIZE, 10.0) == [2]
    got[2] = 900  # fast until 12 s: 100 bytes left, 0.22 s at its rate
    assert pp.pick("b", SIZE, 12.0) == []
    # If it stops here, the rest at its rate falls below b's 1 s once 9 × 1 s have passed since the ask.
    due = pp.next_deadline(12.0)
    assert due == pytest.approx(19.0)
    assert pp.pick("b", SIZE, 18.9) == []
    assert pp.pick("b", SIZE, due) == [2]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, SIZE - 1), st.floats(0.1, 30.0), st.floats(0.1, 30.0))
def test_a_request_at_this_links_share_is_never_duplicated(got: int, took: float, late_by: float) -> None:
    """A request that has moved as fast as pieces from every source did (same rate) is never duplicated, however late."""
    pp = warmed(3, {"a": took, "b": took})
    assert pp.pick("a", SIZE, 0.0) == [2]
    now = 2 * took + late_by  # late: past 2 × the kind's time
    # It received ``got`` bytes in ``now`` seconds, the same per-byte rate as b's whole pieces or faster:
    rate_ok = got / now >= SIZE / took
    pp.progress = lambda i: got
    picked = pp.pick("b", SIZE, now)
    if rate_ok:
        assert picked == []
    else:
        # Slower than b's pieces: duplicated exactly when b's whole piece beats the rest at its rate.
        assert (picked == [2]) == (took * got <= (SIZE - got) * now)


def test_with_nothing_measured_a_trickle_is_late_and_a_moving_piece_is_not() -> None:
    """Nothing measured for peers yet (a resumed fetch, a small model): a request with no bytes is late
    after endgame_delay; one with bytes once past the horizon with its rate so far under the floor."""
    got = {0: 10, 1: 0}
    pp = PiecePicker([SIZE] * 2, endgame_delay=1.0)
    pp.progress = lambda i: got[i]
    for sid in ("a", "b"):
        pp.add_source(sid, PEER, [0, 1])
    assert pp.pick("a", 2 * SIZE, 0.0) == [0, 1]
    assert pp.pick("b", SIZE, 0.5) == []  # younger than endgame_delay
    assert pp.next_deadline(0.5) == 1.0  # piece 1 (no bytes) turns late then; piece 0 (a trickle) at the horizon
    # Piece 0: 10 bytes in 100 s. Piece 1: none. Both are rescued, the older-asked first by index.
    assert sorted(pp.pick("b", SIZE, 100.0) + pp.pick("b", SIZE, 100.0)) == [0, 1]
    # A piece half in after 2 s (2 MiB/s): not late until its rate so far falls under the floor,
    # half a piece / UNMEASURED_FLOOR after its request (by then, at this rate, it is long in).
    big = 8 << 20
    pp2 = PiecePicker([big], endgame_delay=1.0)
    pp2.progress = lambda i: big // 2
    for sid in ("a", "b"):
        pp2.add_source(sid, PEER, [0])
    assert pp2.pick("a", big, 0.0) == [0]
    assert pp2.pick("b", big, 2.0) == []
    assert pp2.next_deadline(2.0) == (big // 2) / UNMEASURED_FLOOR > UNMEASURED_HORIZON


def test_with_nothing_measured_requests_moving_alike_on_one_link_are_not_duplicated() -> None:
    """A node whose whole pipeline shares one slow link: every piece in flight trickles alike, all past
    the horizon; a duplicate would share the same link, so none is made."""
    pp = PiecePicker([SIZE] * 3, endgame_delay=1.0)
    pp.progress = lambda i: 1000 if i in (0, 1) else 0
    for sid in ("a", "b"):
        pp.add_source(sid, PEER, [0, 1])
    assert pp.pick("a", 2 * SIZE, 0.0) == [0, 1]
    assert pp.pick("b", SIZE, 100.0) == []


@pytest.mark.parametrize(
    ("got", "expected"),
    [
        # Pieces took 1 s when the link was quiet; now four requests share it and each has 100 of 1000
        # bytes after 4 s. All late (2 × 1 s), all moving alike: a duplicate would get the same share.
        ({2: 100, 3: 100, 4: 100, 5: 100}, []),
        # One of them gets a tenth of the others' rate (its source is slow): b duplicates it.
        ({2: 100, 3: 100, 4: 10, 5: 100}, [4]),
    ],
)
def test_requests_sharing_a_busy_link_alike_are_not_duplicated(got: dict[int, int], expected: list[int]) -> None:
    pp = warmed(6, {"a": 1.0, "b": 1.0})
    pp.progress = lambda i: got.get(i, 0)
    assert pp.pick("a", 4 * SIZE, 10.0) == [2, 3, 4, 5]
    assert pp.pick("b", SIZE, 14.0) == expected
