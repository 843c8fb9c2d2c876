"""Choking: which interested peers this node uploads to, a pure function of what it served.

Peers that say Interested compete for ``slots`` upload slots; the least
served so far (bytes, ties by peer id) are unchoked: max-min fairness over
bytes served, as libtorrent's fixed-slots choker with a bytes-sent order.
The node re-evaluates every ``rechoke_interval`` and on every change of
interest (node/swarm).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["choose_unchoked"]


def choose_unchoked(interested: Iterable[str], served: Mapping[str, int], slots: int) -> set[str]:
    """Which interested peers to unchoke: the ``slots`` least served so far (ties by id)."""
    ranked = sorted(interested, key=lambda p: (served.get(p, 0), p))
    return set(ranked[: max(slots, 0)])
