"""Swarm membership for one manifest: who shares its first copy, as a pure function of state and ``now``.

Theory of operation
-------------------
The fetch of a manifest spreads the first copy of each piece over the nodes
fetching it (picker rule 6), so it must know who they are. The members are
the peers in session that announced the manifest and are not banned for it,
split into those still fetching and those that hold all of it. A peer that
announced the manifest but holds none of it and is not fetching it (it never
said Interested; ``idle``) is no member: it will never bring a first copy in.
That is the publisher's node after ``name-publish`` without ``--preheat``,
which holds a new version's envelope so that followers can get it; counted,
it would own a share of the pieces that every follower then waits
``owner_timeout`` for and takes from a mirror at once, all together. A peer whose
session just ended stays a member, as it was, for ``grace`` seconds: a control
stream that resets and is dialled again must not move every piece's owner
twice (each move costs mirror requests in flight). A departed peer leaves
the list when the grace is over, when it is in session again (then it counts
as a holder again if it announced the manifest) or when it is banned.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Departed", "Membership", "membership"]

#: peer id -> (when its session ended, whether it held the whole manifest then)
Departed = Mapping[str, tuple[float, bool]]


@dataclass(frozen=True, slots=True)
class Membership:
    peers: tuple[str, ...]  # members still fetching
    complete: tuple[str, ...]  # members that hold every piece
    departed: dict[str, tuple[float, bool]]  # the departed peers still within their grace


def membership(
    holders: Iterable[tuple[str, bool]],
    departed: Departed,
    *,
    in_session: Collection[str],
    banned: Collection[str],
    now: float,
    grace: float,
    idle: Collection[str] = (),
) -> Membership:
    """The members of one manifest's swarm.

    ``holders``: (peer, holds all of it) for every open session that announced
    the manifest; ``in_session``: every peer with an open session; ``departed``:
    peers whose session ended (kept only while their grace lasts); ``idle``:
    holders with an empty bitfield that are not fetching (never members
    unless they hold all of it).
    """
    peers: list[str] = []
    complete: list[str] = []
    for p, whole in holders:
        if p not in banned and (whole or p not in idle):
            (complete if whole else peers).append(p)
    kept: dict[str, tuple[float, bool]] = {}
    for p, (t, whole) in departed.items():
        if p in in_session or now - t >= grace or p in banned:
            continue
        kept[p] = (t, whole)
        (complete if whole else peers).append(p)
    return Membership(tuple(peers), tuple(complete), kept)
