"""Slow sources (protocol/_slowsource.py): a trickle is judged against the other sources (issue 11, item 14)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.protocol._slowsource import SlowSources

MB = 1 << 20


def _run(rates: dict[str, float], until: float, piece: int = MB, step: float = 0.5) -> dict[str, list[float]]:
    """Each source busy from 0 and delivering ``piece`` bytes at its rate (bytes/s); when each got snubbed."""
    ss = SlowSources()
    owed = dict.fromkeys(rates, 0.0)
    snubs: dict[str, list[float]] = {s: [] for s in rates}
    t = 0.0
    while t <= until:
        for s, r in rates.items():
            busy = not ss.snubbed(s, t)
            ss.busy(s, busy, t)
            if busy:
                owed[s] += r * step
                while owed[s] >= piece:
                    owed[s] -= piece
                    ss.delivered(s, piece, t)
        for s in ss.judge(t):
            snubs[s].append(t)
        t += step
    return snubs


@pytest.mark.parametrize(
    ("rates", "snubbed"),
    [
        ({"fast": 50 * MB, "trickle": 0.2}, {"trickle"}),  # 1 byte every 5 s
        ({"a": 50 * MB, "b": 40 * MB, "trickle": 0.2}, {"trickle"}),
        ({"a": 50 * MB, "b": 20 * MB}, set()),  # slower, not far slower
        ({"a": 50 * MB, "b": 8 * MB, "c": 30 * MB}, set()),
        ({"alone": 0.2}, set()),  # a lone slow source is still the best there is
        ({"a": 2 * MB, "b": 0.1 * MB}, {"b"}),  # a twentieth of the others
    ],
)
def test_who_is_snubbed(rates: dict[str, float], snubbed: set[str]) -> None:
    snubs = _run(rates, until=60.0)
    assert {s for s, ts in snubs.items() if ts} == snubbed


def test_a_trickler_is_snubbed_within_seconds_and_backs_off_doubling() -> None:
    snubs = _run({"fast": 50 * MB, "trickle": 0.2}, until=120.0)
    first, *more = snubs["trickle"]
    assert first <= 3.5  # grace 3 s, judged every half second here
    gaps = [b - a for a, b in zip([first, *more], more, strict=False)]
    assert gaps[:3] == [5.0 + 3.0, 10.0 + 3.0, 20.0 + 3.0]  # backoff, then another grace to prove itself
    assert max(gaps) <= 60.0 + 3.0 + 0.5


def test_exact_times_and_deadline() -> None:
    ss = SlowSources(window=5.0, grace=3.0, ratio=0.1, backoff=5.0)
    ss.busy("a", True, 0.0)
    ss.busy("t", True, 1.0)
    assert ss.next_deadline() == 3.0
    ss.delivered("a", MB, 2.0)
    assert ss.judge(3.9) == []  # t's grace runs to 4.0
    assert ss.judge(4.0) == ["t"]
    assert ss.snubbed("t", 8.999) and not ss.snubbed("t", 9.0)
    assert ss.snubbed_until("t") == 9.0
    ss.forget("t")
    assert not ss.snubbed("t", 5.0)


def test_a_delivery_after_a_snub_resets_the_backoff() -> None:
    ss = SlowSources(backoff=5.0)
    ss.busy("a", True, 0.0)
    ss.busy("t", True, 0.0)
    ss.delivered("a", MB, 1.0)
    assert ss.judge(3.0) == ["t"]
    ss.busy("t", True, 8.0)
    ss.delivered("a", MB, 9.0)
    assert ss.judge(11.0) == ["t"] and ss.snubbed_until("t") == 21.0  # doubled
    ss.busy("t", True, 21.0)
    ss.delivered("t", MB, 21.5)
    ss.delivered("a", MB, 21.6)
    assert ss.judge(24.0) == []
    ss.busy("t", False, 24.0)
    ss.busy("t", True, 30.0)
    ss.delivered("a", MB, 31.0)
    assert ss.judge(33.0) == ["t"] and ss.snubbed_until("t") == 38.0  # back to the base backoff


@settings(max_examples=200, deadline=None)
@given(rates=st.lists(st.floats(2 * MB, 100 * MB), min_size=1, max_size=6))
def test_sources_within_a_factor_of_five_are_never_snubbed(rates: list[float]) -> None:
    top = max(rates)
    rates = [max(r, top / 5) for r in rates]
    snubs = _run({f"s{i}": r for i, r in enumerate(rates)}, until=30.0)
    assert not any(snubs.values())
