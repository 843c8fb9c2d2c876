"""Fleet roll-out: when a follower's update may start asking mirrors. Pure: ``now`` is a parameter.

Theory of operation
-------------------
A fleet that follows a name learns of a new version at about the same
moment (the publisher pushes the record to its session peers, and they to
theirs), but each follower then resolves the record and fetches the signed
manifest on its own, so their fetches of the new manifest start up to a few
hundred milliseconds apart (seconds on a loaded host). The first copy of each
changed piece is shared by rendezvous ownership over the members of the new
manifest's swarm (protocol/_ownership.py): every follower that computes the
owners before it knows the others takes pieces that another follower takes
too, and the origin serves them twice.

Every follower already knows who the rest of the fleet is: its session
peers that hold the version being replaced. So before the first request,
an update waits (:func:`rollout_waiting`) until each of them

* has announced the new manifest, and
* is a first-copy member of it (it holds some of it or said Interested),
  or announced it ``idle_grace`` ago without becoming one: the publisher's
  node announces a new version it does not fetch (it keeps the envelope for
  the followers); a follower's Interested trails its Announce by one round
  trip, far less than the grace,

or until ``bound`` after the wait began: a follower that a staged record
does not admit yet, or one that is down, never announces it. Then every
follower computes the owners over the same members and each changed piece
comes from the origin once; pieces the new version shares with the old one
are copied locally, as before.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

__all__ = ["ROLLOUT_BOUND", "ROLLOUT_IDLE_GRACE", "RolloutWait", "rollout_waiting"]

ROLLOUT_BOUND = 4.0  # seconds an update waits for the rest of the fleet at most
ROLLOUT_IDLE_GRACE = 0.5  # seconds from a peer's Announce to its Interested, at most, before it counts as idle


@dataclass(frozen=True, slots=True)
class RolloutWait:
    waiting: frozenset[str]  # the fleet peers still waited for (empty: go)
    recheck: float | None  # when the answer changes by itself (a grace or the bound runs out); None: go


def rollout_waiting(
    fleet: Iterable[str],
    announced: Mapping[str, float],
    members: Collection[str],
    now: float,
    *,
    started: float,
    bound: float = ROLLOUT_BOUND,
    idle_grace: float = ROLLOUT_IDLE_GRACE,
) -> RolloutWait:
    """Whom an update still waits for before its fetch starts.

    ``fleet``: session peers holding the version being replaced;
    ``announced``: peer -> when this node first saw it announce the new
    manifest; ``members``: the new manifest's first-copy members now;
    ``started``: when the wait began.
    """
    end = started + bound
    if now >= end:
        return RolloutWait(frozenset(), None)
    waiting: set[str] = set()
    times = [end]
    for p in fleet:
        if p in members:
            continue
        t = announced.get(p)
        if t is None:
            waiting.add(p)
        elif now < t + idle_grace:
            waiting.add(p)
            times.append(t + idle_grace)
    if not waiting:
        return RolloutWait(frozenset(), None)
    return RolloutWait(frozenset(waiting), min(times))
