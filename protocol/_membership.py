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
``owner_timeout`` for and takes from a mirror at once, all together.

*The first round*: an idle peer is a member for its first ``first_round``
seconds all the same (``idle`` maps it to when it became one: when it
announced the manifest, or when this fetch began if that was later). A
fetcher's Interested follows our Announce by a round trip (it says
Interested once it sees that we hold the manifest), so at its first mirror
picks a fetch would count only the fetchers whose Interested had arrived:
under load, 0 of 14 holders (docs/benchmarks.md, "The start race"), and
take the other fetchers' shares from the mirror as its own. Counted at
once, they keep their shares; a truly idle peer is out after
``first_round``, its share back to the others. ``next_change`` says when
the members change by time alone (a grace or a first round ends), for the
caller to ask again then.

*Departed members*: a peer whose session just ended stays a member, as it
was, for ``grace`` seconds: a control stream that resets and is dialled
again must not move every piece's owner twice (each move costs mirror
requests in flight). It leaves the list when the grace is over, when it
announced the manifest again (then it counts as a holder again) or when it
is banned. Merely being in session again is not enough: a new session's
Hello takes a round trip (seconds under load), and a member dropped for
that long moved every piece's owner and back (docs/benchmarks.md, "own
share, never heard of").
"""

from __future__ import annotations

import math
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
    next_change: float = math.inf  # when a grace or a first round ends (the members change by time alone)


def membership(
    holders: Iterable[tuple[str, bool]],
    departed: Departed,
    *,
    banned: Collection[str],
    now: float,
    grace: float,
    idle: Mapping[str, float] | Collection[str] = (),
    first_round: float = 0.0,
) -> Membership:
    """The members of one manifest's swarm.

    ``holders``: (peer, holds all of it) for every open session that announced
    the manifest; ``departed``:
    peers whose session ended (kept only while their grace lasts and until
    they announce again); ``idle``: holders with an empty bitfield that are
    not fetching, with when each became one (a plain collection: long ago);
    members only within their first ``first_round`` seconds, or if they hold
    all of it.
    """
    since = idle if isinstance(idle, Mapping) else dict.fromkeys(idle, -math.inf)
    peers: list[str] = []
    complete: list[str] = []
    announced: set[str] = set()
    nxt = math.inf
    for p, whole in holders:
        announced.add(p)
        if p in banned:
            continue
        t = since.get(p)
        if t is not None and not whole:
            if now >= t + first_round:
                continue
            nxt = min(nxt, t + first_round)
        (complete if whole else peers).append(p)
    kept: dict[str, tuple[float, bool]] = {}
    for p, (t, whole) in departed.items():
        if p in announced or now >= t + grace or p in banned:
            continue
        kept[p] = (t, whole)
        nxt = min(nxt, t + grace)
        (complete if whole else peers).append(p)
    return Membership(tuple(peers), tuple(complete), kept, nxt)
