"""Owners' promises kept incrementally (protocol/_ownership.py ``Promises``) answer as a full scan does.

``FirstCopy`` asks when a member's first outstanding promise breaks on
every Have, every mirror pick and every staleness query; ``Promises`` keeps
the answer in two heaps per member instead of scanning the member's
promises each time. Under any sequence of Haves, requests, arrivals and
departures its answer equals the scan's, for any promise timeouts; so does
``piece_due`` and ``gone_due``, when a piece's first promise breaks (by
members still credible, or by members that left, their claims included).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.protocol._ownership import Promises

MEMBERS = ["a", "b", "c"]


class _Scan:
    """The rule as FirstCopy stated it before: every promise of the member, every time."""

    def __init__(self) -> None:
        self.pending: dict[str, dict[int, float]] = {}
        self.asked: dict[int, float] = {}
        self.gone: dict[int, list[float]] = {}  # piece -> Haves and claims of members that left (kept)
        self.claims: dict[str, dict[int, float]] = {}

    def add(self, m: str, i: int, have: float) -> None:
        self.pending.setdefault(m, {}).setdefault(i, have)

    def requested(self, i: int, now: float) -> None:
        self.asked.setdefault(i, now)

    def done(self, i: int) -> float | None:
        for p in [*self.pending.values(), *self.claims.values()]:
            p.pop(i, None)
        self.gone.pop(i, None)
        return self.asked.pop(i, None)

    def claimed(self, m: str, i: int, at: float) -> None:
        self.claims.setdefault(m, {})[i] = at

    def forget(self, m: str, *, keep: bool) -> None:
        for i, h in [*self.pending.pop(m, {}).items(), *self.claims.pop(m, {}).items()]:
            if keep:
                self.gone.setdefault(i, []).append(h)

    def piece_due(self, i: int, deliver: float, unasked: float, credible: set[str]) -> float | None:
        return self._due(i, [p[i] for m, p in self.pending.items() if i in p and m in credible], deliver, unasked)

    def gone_due(self, i: int, deliver: float, unasked: float) -> float | None:
        return self._due(i, self.gone.get(i, []), deliver, unasked)

    def _due(self, i: int, haves: list[float], deliver: float, unasked: float) -> float | None:
        if not haves:
            return None
        return max(min(haves), self.asked[i]) + deliver if i in self.asked else min(haves) + unasked

    def due(self, m: str, deliver: float, unasked: float) -> float | None:
        p = self.pending.get(m)
        if not p:
            return None
        return min(max(h, self.asked[i]) + deliver if i in self.asked else h + unasked for i, h in p.items())


_times = st.integers(0, 50).map(float)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(MEMBERS), st.integers(0, 7), _times),
        st.tuples(st.just("requested"), st.integers(0, 7), _times),
        st.tuples(st.just("done"), st.integers(0, 7)),
        st.tuples(st.just("forget"), st.sampled_from(MEMBERS), st.booleans()),
        st.tuples(st.just("claimed"), st.sampled_from(MEMBERS), st.integers(0, 7), _times),
        st.tuples(st.just("gone_due"), st.integers(0, 7), st.floats(0.5, 100.0), st.floats(0.5, 300.0)),
        st.tuples(st.just("due"), st.sampled_from(MEMBERS), st.floats(0.5, 100.0), st.floats(0.5, 300.0)),
        st.tuples(st.just("piece_due"), st.integers(0, 7), st.floats(0.5, 100.0), st.floats(0.5, 300.0),
                  st.sets(st.sampled_from(MEMBERS))),
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(_ops)
def test_incremental_due_equals_the_full_scan(ops: list[tuple]) -> None:
    fast, scan = Promises(), _Scan()
    for op, *args in ops:
        if op in ("due", "gone_due"):
            assert getattr(fast, op)(*args) == getattr(scan, op)(*args), ops
        elif op == "piece_due":
            i, deliver, unasked, credible = args
            assert fast.piece_due(i, deliver, unasked, credible.__contains__) == scan.piece_due(*args)
        elif op == "forget":
            fast.forget(args[0], keep=args[1])
            scan.forget(args[0], keep=args[1])
        elif op == "done":
            assert fast.done(*args) == scan.done(*args)
        else:
            getattr(fast, op)(*args)
            getattr(scan, op)(*args)
        for m in MEMBERS:
            assert fast.outstanding(m) == len(scan.pending.get(m, ()))
    for m in MEMBERS:
        assert fast.due(m, 10.0, 30.0) == scan.due(m, 10.0, 30.0)


def test_table() -> None:
    p = Promises()
    assert p.due("a", 10.0, 30.0) is None
    p.add("a", 1, 5.0)  # unrequested: due 5 + 30
    p.add("a", 2, 6.0)
    assert p.due("a", 10.0, 30.0) == 35.0
    p.requested(2, 20.0)  # asked at 20: due 20 + 10, earlier than 35
    assert p.due("a", 10.0, 30.0) == 30.0
    p.add("a", 2, 1.0)  # a repeated Have changes nothing
    assert p.due("a", 10.0, 30.0) == 30.0
    assert p.done(2) == 20.0  # arrived: kept; the time it was first asked for
    assert p.due("a", 10.0, 30.0) == 35.0
    p.requested(1, 2.0)  # asked before the Have: the clock runs from the Have
    assert p.due("a", 10.0, 30.0) == 15.0
    p.forget("a", keep=True)  # it left: its Have still says piece 1 is in the swarm
    assert p.due("a", 10.0, 30.0) is None
    assert p.piece_due(1, 10.0, 30.0, lambda m: True) is None  # no member promises it now ...
    assert p.gone_due(1, 10.0, 30.0) == 15.0  # ... one that left did
    p.claimed("b", 4, 7.0)  # b asked a mirror for piece 4 at 7
    assert p.gone_due(4, 10.0, 30.0) is None  # while b is a member, its claim is FirstCopy's business
    p.forget("b", keep=True)
    assert p.gone_due(4, 10.0, 30.0) == 37.0  # it left: the claim says the piece is on its way, for a while
    p.claimed("c", 5, 7.0)
    p.forget("c", keep=False)  # a liar's claim holds nothing back
    assert p.gone_due(5, 10.0, 30.0) is None
    assert p.outstanding("a") == 0


def test_a_long_run_of_kept_promises() -> None:
    """Thousands of promises kept and pieces asked for again: the answer stays right (dead entries are dropped)."""
    p = Promises()
    for k in range(5000):
        p.add("a", k % 50, float(k))
        p.requested(k % 50, float(k) + 1)
        assert p.due("a", 10.0, 30.0) is not None
        p.done(k % 50)
    assert p.due("a", 10.0, 30.0) is None
    p.add("a", 7, 1.0)
    assert p.due("a", 10.0, 30.0) == 31.0
