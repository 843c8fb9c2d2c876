"""A token bucket shared by every transfer in one direction (global up or down limit)."""

from __future__ import annotations

import trio

__all__ = ["RateLimiter"]


class RateLimiter:
    """Bytes per second, or unlimited when ``rate`` is None.

    Callers take their bytes before sending (upload) or after receiving
    (download); a caller that overdraws waits exactly until the bucket refills,
    so one lock-ordered queue gives every transfer its turn.
    """

    def __init__(self, rate: float | None, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else (max(rate * 0.25, 256 * 1024) if rate else 0.0)
        self._tokens = self.burst
        self._stamp: float | None = None
        self._lock = trio.Lock()
        self.waits = 0  # acquisitions that had to wait, and for how long in all (metrics)
        self.waited_seconds = 0.0

    async def acquire(self, n: int) -> None:
        if not self.rate:
            return
        async with self._lock:
            now = trio.current_time()
            if self._stamp is not None:
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            if self._tokens < 0:
                self.waits += 1
                self.waited_seconds += -self._tokens / self.rate
                await trio.sleep(-self._tokens / self.rate)
