"""Slow sources: which source to take requests from because it is far slower than the others. Pure.

Theory of operation (libtorrent's snubbed peers)
------------------------------------------------
Silence alone is a weak test: a peer that sends one byte every 5 s is never
silent for the transport's stall timeout, and holds its requests for ever.
So each source is judged by what it delivers (verified pieces, in bytes)
against the other sources of the same fetch:

* a source is judged only once it has had requests in flight for ``grace``
  seconds without a break (a fresh request has not had time to deliver);
* its rate is the bytes it delivered within the last ``window`` seconds
  (or since its requests began, if later) over that time;
* the reference is the median rate of the *other* sources that delivered
  something in the window; with no such source there is no judgement (a
  lone slow source is still the best one there is);
* a source below ``ratio`` of the reference is *snubbed*: the caller takes
  its requests back (they go to other sources at once) and gives it none
  for ``backoff`` seconds, doubled on each snub up to ``max_backoff``, reset
  by a delivery while not snubbed.

Time is a parameter; :meth:`SlowSources.next_deadline` says when judging
again may snub someone.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

__all__ = ["SlowSources"]


@dataclass(slots=True)
class _Track:
    busy_since: float | None = None  # requests in flight without a break since
    got: deque[tuple[float, int]] = field(default_factory=deque)  # (when, bytes) delivered
    snubbed_until: float = 0.0
    backoff: float = 0.0


class SlowSources:
    """Per-source delivery within a window, and the snubbing rule."""

    def __init__(
        self,
        *,
        window: float = 5.0,
        grace: float = 3.0,
        ratio: float = 0.1,
        backoff: float = 5.0,
        max_backoff: float = 60.0,
    ) -> None:
        self.window = window
        self.grace = grace
        self.ratio = ratio
        self.base_backoff = backoff
        self.max_backoff = max_backoff
        self._t: dict[str, _Track] = {}

    def _track(self, source: str) -> _Track:
        t = self._t.get(source)
        if t is None:
            t = self._t[source] = _Track()
        return t

    def forget(self, source: str) -> None:
        self._t.pop(source, None)

    def busy(self, source: str, in_flight: bool, now: float) -> None:
        """Whether ``source`` has requests in flight now (call on every change)."""
        t = self._track(source)
        if not in_flight:
            t.busy_since = None
        elif t.busy_since is None:
            t.busy_since = now

    def delivered(self, source: str, nbytes: int, now: float) -> None:
        """``source`` delivered a verified piece of ``nbytes``."""
        t = self._track(source)
        t.got.append((now, nbytes))
        if now >= t.snubbed_until:
            t.backoff = 0.0
        self._trim(t, now)

    def snubbed(self, source: str, now: float) -> bool:
        t = self._t.get(source)
        return t is not None and now < t.snubbed_until

    def snubbed_until(self, source: str) -> float:
        t = self._t.get(source)
        return 0.0 if t is None else t.snubbed_until

    def _trim(self, t: _Track, now: float) -> None:
        while t.got and t.got[0][0] < now - self.window:
            t.got.popleft()

    def rate(self, source: str, now: float) -> float:
        """Bytes/s delivered within the window (since its requests began, if later)."""
        t = self._t.get(source)
        if t is None:
            return 0.0
        self._trim(t, now)
        start = now - self.window if t.busy_since is None else max(now - self.window, t.busy_since)
        span = max(now - start, 1e-9)
        return sum(n for w, n in t.got if w >= start) / span

    def judge(self, now: float) -> list[str]:
        """The sources to snub now (each then gets no request until :meth:`snubbed_until`)."""
        out = []
        for s, t in self._t.items():
            if t.busy_since is None or now - t.busy_since < self.grace or now < t.snubbed_until:
                continue
            others = [self.rate(o, now) for o, ot in self._t.items() if o != s and ot.got]
            others = [r for r in others if r > 0]
            if not others:
                continue
            if self.rate(s, now) < self.ratio * statistics.median(others):
                out.append(s)
        for s in out:
            t = self._t[s]
            t.backoff = min(self.max_backoff, t.backoff * 2 if t.backoff else self.base_backoff)
            t.snubbed_until = now + t.backoff
            t.busy_since = None
        return out

    def next_deadline(self) -> float | None:
        """When a busy source's grace ends or a snub is over (judge or schedule again then)."""
        times = [t.busy_since + self.grace for t in self._t.values() if t.busy_since is not None]
        times += [t.snubbed_until for t in self._t.values() if t.snubbed_until > 0]
        return min(times, default=None)
