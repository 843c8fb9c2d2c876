"""Per-peer rate budgets and the ledger of broken promises: pure, ``now`` is a parameter.

A :class:`TokenBucket` refills at ``rate`` per second up to ``burst``; a
message that finds it empty is over the budget (the session ends:
docs/security.md, "Budgets per peer"). A :class:`PromiseLedger` counts, per
(peer, manifest), the requests for pieces the peer advertised that it then
refused as not held or stalled on; ``limit`` of them within ``window``
seconds is a lie told repeatedly, and the peer is banned for that manifest
for a stated time.
"""

from __future__ import annotations

from collections import deque

__all__ = ["PromiseLedger", "TokenBucket"]


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    __slots__ = ("_at", "_left", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self._left, self._at = float(burst), now

    def take(self, now: float, n: float = 1.0) -> bool:
        """Spend ``n`` tokens; False (nothing spent) when there are not enough."""
        left = min(self.burst, self._left + max(now - self._at, 0.0) * self.rate)
        self._at = now
        if left < n:
            self._left = left
            return False
        self._left = left - n
        return True


class PromiseLedger:
    """Broken promises per (peer, manifest) within a sliding window; bounded to ``max_keys`` pairs."""

    def __init__(self, limit: int, window: float, max_keys: int = 4096) -> None:
        self.limit, self.window, self._max_keys = limit, window, max_keys
        self._broken: dict[tuple[str, bytes], deque[float]] = {}

    def broken(self, peer: str, manifest_id: bytes, now: float) -> bool:
        """Record one broken promise; True when this makes ``limit`` within ``window`` (then the count restarts)."""
        key = (peer, manifest_id)
        times = self._broken.get(key)
        if times is None:
            if len(self._broken) >= self._max_keys:
                self._prune(now)
            times = self._broken[key] = deque()
        while times and now - times[0] >= self.window:
            times.popleft()
        times.append(now)
        if len(times) < self.limit:
            return False
        del self._broken[key]
        return True

    def __len__(self) -> int:
        """(peer, manifest) pairs with broken promises on record."""
        return len(self._broken)

    def count(self, peer: str, manifest_id: bytes, now: float) -> int:
        return sum(1 for t in self._broken.get((peer, manifest_id), ()) if now - t < self.window)

    def _prune(self, now: float) -> None:
        for key in [k for k, ts in self._broken.items() if not ts or now - ts[-1] >= self.window]:
            del self._broken[key]
        while len(self._broken) >= self._max_keys:  # all recent: the oldest entry goes
            del self._broken[next(iter(self._broken))]
