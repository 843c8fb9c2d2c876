"""protocol/_rollout.py: when an update may start, as a table; and the membership rule it relies on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoglm.protocol._membership import membership
from autoglm.protocol._namerecord import ROLLOUT_FULL, rollout_admits
from autoglm.protocol._ownership import FirstCopy
from autoglm.protocol._rollout import RolloutWait, fleet_for, rollout_waiting

B, G = 4.0, 0.5  # bound, idle grace


@pytest.mark.parametrize(
    ("fleet", "announced", "members", "now", "waiting", "recheck"),
    [
        # no fleet (a first fetch, or nobody else holds the old version): go at once
        ("", {}, "", 0.0, "", None),
        # every fleet peer is a member of the new manifest: go
        ("ab", {"a": 0.0, "b": 0.1}, "ab", 0.2, "", None),
        # one has not announced it yet: wait for it, until the bound
        ("ab", {"a": 0.0}, "a", 0.2, "b", B),
        # announced but not (yet) a member: wait out the grace from its announce ...
        ("ab", {"a": 0.0, "b": 0.1}, "a", 0.2, "b", 0.1 + G),
        # ... then it counts as idle (the publisher's node keeping the envelope): go
        ("ab", {"a": 0.0, "b": 0.1}, "a", 0.1 + G, "", None),
        # b's grace is over (idle); a has not announced, c's grace runs: look again when c's ends
        ("abc", {"b": 0.3, "c": 1.0}, "", 1.2, "ac", 1.0 + G),
        # the bound ends every wait, exactly then
        ("ab", {}, "", B - 0.001, "ab", B),
        ("ab", {}, "", B, "", None),
        # members outside the fleet (fetchers that never held the old version) change nothing
        ("a", {"a": 0.0, "x": 0.0}, "ax", 0.0, "", None),
    ],
)
def test_rollout_wait_table(
    fleet: str, announced: dict[str, float], members: str, now: float, waiting: str, recheck: float | None
) -> None:
    w = rollout_waiting(fleet, announced, set(members), now, started=0.0, bound=B, idle_grace=G)
    assert w == RolloutWait(frozenset(waiting), recheck)


@given(
    fleet=st.sets(st.sampled_from("abcdef")),
    announced=st.dictionaries(st.sampled_from("abcdef"), st.floats(0, 5)),
    members=st.sets(st.sampled_from("abcdef")),
    now=st.floats(0, 10),
)
def test_rollout_wait_always_ends_and_rechecks_in_the_future(
    fleet: set[str], announced: dict[str, float], members: set[str], now: float
) -> None:
    w = rollout_waiting(fleet, announced, members, now, started=0.0, bound=B, idle_grace=G)
    assert w.waiting <= fleet - members
    if w.waiting:
        assert w.recheck is not None and now < w.recheck <= B
    else:
        assert w.recheck is None
    assert rollout_waiting(fleet, announced, members, B, started=0.0, bound=B) == RolloutWait(frozenset(), None)


@pytest.mark.parametrize(
    ("holders", "idle", "peers", "complete"),
    [
        # an announcer with nothing of it that does not fetch it is no member (the publisher's node) ...
        ([("p", False), ("a", False)], "p", "a", ""),
        # ... but one that holds all of it always is (a preheated publisher)
        ([("p", True), ("a", False)], "p", "a", "p"),
        # fetchers, idle or not, as before
        ([("a", False), ("b", False)], "", "ab", ""),
    ],
)
def test_idle_announcers_are_no_first_copy_members(
    holders: list[tuple[str, bool]], idle: str, peers: str, complete: str
) -> None:
    m = membership(holders, {}, banned=set(), now=0.0, grace=5.0, idle=set(idle))
    assert (m.peers, m.complete) == (tuple(peers), tuple(complete))


def test_the_fleet_is_the_old_versions_holders_the_record_admits() -> None:
    mid = b"\x05" * 32
    holders = [f"peer{i}" for i in range(200)]
    assert fleet_for(holders, mid) == frozenset(holders)  # a full roll-out, or an update by manifest
    assert fleet_for(holders, mid, 0) == frozenset()
    tenth = fleet_for(holders, mid, ROLLOUT_FULL // 10)
    # exactly the followers that will take it (the rule each of them applies to itself)
    assert tenth == {p for p in holders if rollout_admits(p, mid, ROLLOUT_FULL // 10)}
    assert 5 <= len(tenth) <= 40
    assert tenth <= fleet_for(holders, mid, ROLLOUT_FULL // 2)  # a larger share only adds peers


def test_time_spent_waiting_for_the_fleet_is_no_owners_silence() -> None:
    """Members are known while an update waits; an owner's owner_timeout runs from the first request."""
    fc = FirstCopy("me", [1 << 22] * 8, owner_timeout=20.0)
    fc.set_members(["a", "b"], now=0.0)
    theirs = [i for i in range(8) if fc.owner(i) != "me"]
    assert theirs and not fc.mirror_may_take(theirs[0], 19.0)
    assert fc.mirror_may_take(theirs[0], 20.0)  # without the restart: stale 20 s after it was first seen
    fc.restart_clock(15.0)  # the fetch starts 15 s later (the fleet wait)
    assert not any(fc.mirror_may_take(i, 34.9) for i in theirs)
    assert all(fc.mirror_may_take(i, 35.0) for i in theirs)
    fc.restart_clock(5.0)  # never moves a clock back
    assert all(fc.mirror_may_take(i, 35.0) for i in theirs)
