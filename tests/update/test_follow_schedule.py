"""The follower's poll schedule (pure; time is a parameter): backoff, reset, push, and the bound."""

from __future__ import annotations

import pytest

from autoglm.node._follow import _WAKE_GAP, PollSchedule
from autoglm.node.errors import ConfigError


def test_backoff_doubles_to_the_cap_and_a_change_resets_it() -> None:
    s = PollSchedule(5, 60)
    assert s.deadline == float("-inf")  # poll at once on start
    gaps = []
    now = 0.0
    for changed in (False, False, False, False, False, True, False):
        s.polled(now, changed)
        gaps.append(s.deadline - now)
        now = s.deadline
    assert gaps == [10, 20, 40, 60, 60, 5, 10]


@pytest.mark.parametrize("lo,hi", [(1, 8), (5, 60), (0.5, 0.5)])
def test_no_gap_between_polls_exceeds_the_cap(lo: float, hi: float) -> None:
    """What bounds the pick-up time: a record published at t is polled by t + hi."""
    s = PollSchedule(lo, hi)
    now = 0.0
    for i in range(200):
        s.polled(now, changed=(i % 37 == 0))
        assert s.deadline - now <= hi
        now = s.deadline


def test_a_push_pulls_the_poll_forward_but_not_closer_than_the_wake_gap() -> None:
    s = PollSchedule(5, 60)
    s.polled(100.0, changed=False)
    assert s.deadline == 110.0
    s.pushed(100.1)
    assert s.deadline == 100.0 + _WAKE_GAP  # a peer cannot make it poll in a tight loop
    s.pushed(103.0)
    assert s.deadline == 100.0 + _WAKE_GAP  # never later than it was
    s.polled(100.5, changed=True)
    s.pushed(102.0)
    assert s.deadline == 102.0


def test_bad_intervals_refused() -> None:
    for lo, hi in ((0, 5), (10, 5), (-1, 1)):
        with pytest.raises(ConfigError):
            PollSchedule(lo, hi)
