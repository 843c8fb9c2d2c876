"""The swarm's pace: how much longer than the fixed first-copy timers owners may take. Pure.

protocol/_ownership.py (``FirstCopy``) multiplies every timer by
``Pace.scale()``: an owner that brings its first copies in as slowly as the
rest of the swarm keeps its share; one that stops while the others go on is
stale after the pace's timeout. The theory is in _ownership.py's docstring
("The swarm's pace"); this module keeps the samples the pace is taken from.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

__all__ = ["MAX_SCALE", "PACE_FACTOR", "PACE_QUANTILE", "Pace", "pace_scale"]

PACE_FACTOR = 4.0  # an owner is stale when silent this many times the swarm's typical gap
MAX_SCALE = 8.0  # ... but never later than this many times the fixed timers
_PACE_SAMPLES = 64  # the latest owner gaps (and request waits) the pace is taken from
PACE_QUANTILE = 1.0  # the pace is the time this fraction of the owners' gaps were within


def pace_scale(gaps: Sequence[float], shown: int, owners: int, floor: float, *,
               factor: float = PACE_FACTOR, max_scale: float = MAX_SCALE) -> float:
    """How much longer than ``floor`` (``owner_timeout``) an owner may stay silent: in [1, max_scale].

    ``gaps``: the silences the swarm's owners showed before each of their
    recent first copies (from joining to the first, then between them);
    ``shown``: how many of the ``owners`` showed one at all. While none has,
    nothing says waiting helps (a lone liar, or a swarm that does not move):
    1, the fixed timers. While fewer than
    ``PACE_QUANTILE`` of the owners have shown anything, the swarm's slow
    tail is not known yet (the silent owners' gaps are longer than anything
    seen): ``max_scale``. Otherwise ``factor`` times that quantile of the
    gaps, over ``floor``.
    """
    if owners <= 0 or shown <= 0:
        return 1.0
    if shown < PACE_QUANTILE * owners or not gaps:
        return max_scale
    xs = sorted(gaps)
    q = xs[min(len(xs) - 1, int(PACE_QUANTILE * len(xs)))]
    return min(max_scale, max(1.0, factor * q / floor))


class Pace:
    """The samples of one fetch's pace: owners' gaps before their first copies, and our peer requests' waits.

    ``floor`` is ``owner_timeout``. The owners are the members that own some
    piece by rendezvous (``set_owners``); an owner *shows* itself by one of
    its first copies (``first_copy``) or, a holder that sends no Haves, by
    delivering a piece (``shown_by_delivery``).
    """

    def __init__(self, floor: float, *, max_scale: float = MAX_SCALE, factor: float = PACE_FACTOR) -> None:
        self.floor = floor
        self.max_scale = max_scale
        self.factor = factor
        self._owners: set[str] = set()  # members that own some piece by rendezvous (this node aside)
        self._shown: set[str] = set()  # ... of which showed one of its first copies at least once
        self._shown_at: dict[str, float] = {}  # member -> when it last showed one of its first copies
        self._gaps: deque[float] = deque(maxlen=_PACE_SAMPLES)  # owners' silences before their progress
        self._waits: deque[float] = deque(maxlen=_PACE_SAMPLES)  # our peer requests: first request to arrival
        self._scale: float | None = None  # cached pace_scale (None: recompute)
        self._median_wait: float | None = None  # cached median of _waits (None: recompute)

    def set_owners(self, owners: set[str]) -> None:
        """The members that own some piece now (a new membership)."""
        self._owners = owners
        self._shown &= owners
        self._scale = None

    def forget(self, member: str) -> None:
        """``member`` left: its next first copy (if it comes back) is timed from its new session."""
        self._shown_at.pop(member, None)

    def first_copy(self, member: str, now: float, since: float) -> None:
        """``member`` showed one of its own first copies at ``now``; its silence ran from its last one, or ``since``."""
        self._gaps.append(max(0.0, now - self._shown_at.get(member, since)))
        self._shown_at[member] = now
        if member in self._owners:
            self._shown.add(member)
        self._scale = None

    def shown_by_delivery(self, member: str) -> None:
        """``member`` (which sent no Haves: a seed) delivered a piece: it shows itself for the pace."""
        if member in self._owners and member not in self._shown:
            self._shown.add(member)
            self._scale = None

    def served(self, wait: float) -> None:
        """One of our peer requests was served ``wait`` seconds after we first asked."""
        self._waits.append(max(0.0, wait))
        self._median_wait = None

    def scale(self) -> float:
        """How many times the fixed timers an owner may take now (see pace_scale)."""
        if self._scale is None:
            self._scale = pace_scale(self._gaps, len(self._shown), len(self._owners), self.floor,
                                     factor=self.factor, max_scale=self.max_scale)
        return self._scale

    def deliver(self, timeout: float) -> float:
        """The promise timeout now: ``timeout`` (``deliver_timeout``) times the pace's scale, or ``factor`` times the
        median time our peer requests take to be served, whichever is longer, within ``max_scale`` times it."""
        k = self.scale()
        if self._waits:
            if self._median_wait is None:
                xs = sorted(self._waits)
                self._median_wait = xs[len(xs) // 2]
            k = max(k, self.factor * self._median_wait / timeout)
        return timeout * min(k, self.max_scale)
