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
  trip. That is milliseconds on a quiet LAN, but more than half a second was
  measured with 9 nodes on a 2-core host under a load of 27 (bench/rollout_bench.py
  with a 0.5 s grace: three followers started with 0-2 of 7 peers as members,
  and 1.83x the changed bytes left the origin), hence 2 s,

or until ``bound`` after the wait began (a holder of the old version that
is down, or does not follow the name, never announces it). The followers
that a staged record does not admit (:func:`fleet_for`: the same
deterministic rule as protocol/_namerecord.py ``rollout_admits``) are not
waited for. Then every follower computes the owners over the same members
and each changed piece comes from the origin once; pieces the new version
shares with the old one are copied locally, as before.

The bound is long (20 s) because it only matters when something is off: on
the 2-core test host under a load of 49, nine nodes learned of a new record
17 s apart (bench/rollout_bench.py), and with an 8 s bound the first ones
started with 4-5 of 7 peers as members (1.17x the changed bytes from the
origin).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from ._namerecord import ROLLOUT_FULL, rollout_admits

__all__ = ["ROLLOUT_BOUND", "ROLLOUT_IDLE_GRACE", "RolloutWait", "fleet_for", "rollout_waiting"]

ROLLOUT_BOUND = 20.0  # seconds an update waits for the rest of the fleet at most
ROLLOUT_IDLE_GRACE = 2.0  # seconds from a peer's Announce to its Interested, at most, before it counts as idle


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


def fleet_for(old_holders: Iterable[str], manifest_id: bytes, rollout: int = ROLLOUT_FULL) -> frozenset[str]:
    """The peers an update of ``manifest_id`` waits for: the holders of the old version that the record's
    roll-out share (ppm) admits; all of them for a full roll-out or an update by manifest."""
    return frozenset(p for p in old_holders if rollout_admits(p, manifest_id, rollout))
