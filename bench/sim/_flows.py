"""Simulated time and links: an event queue and a fair-share flow model.

Every transfer is a *flow* from one capacity (a node's uplink, or the
origin's) to another (a node's downlink). Rates are recomputed only where
something changed, at the instant it changed (a flow started or ended):

1. a source whose flows changed splits its capacity over them by
   water-filling, each flow's demand being its destination's equal share
   (``down / flows in``) at that moment;
2. each destination splits its capacity over its incoming flows by
   water-filling, each flow's demand being what step 1 gave it.

The result is always feasible (no capacity is exceeded) and equals max-min
fairness whenever one side of every flow is the bottleneck; where both sides
bind for different flows it can leave a little capacity unused, so simulated
times err long, never short (docs/simulation.md). A *host* caps the sum of
several downlinks (nodes sharing one machine's CPU, as in the loopback
benchmark): each active downlink gets ``host.cap / active`` at most.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

__all__ = ["Event", "Flow", "Host", "Link", "Loop", "Net"]

# A queue entry: [time, sequence, callable or None once cancelled, args].
Event = list[Any]


class Loop:
    """A discrete-event queue: ``at(t, fn, *args)``; ``run(until)`` pops in time order (ties: insertion order)."""

    # Cancelled entries stay in the heap until popped, or until they outnumber the live ones
    # (then the heap is rebuilt without them): a link with F flows re-times all F of them on
    # every change, and without this the heap held O(F) dead finish events per change
    # (10,000 nodes: millions of them, GBs; docs/benchmarks.md "10,000 nodes").
    COMPACT_MIN = 50_000

    def __init__(self) -> None:
        self.now = 0.0
        self._q: list[Event] = []
        self._seq = itertools.count()
        self.events = 0
        self.cancelled = 0  # dead entries still in the heap
        self.after_batch: Callable[[], None] | None = None

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> Event:
        """Run ``fn(*args)`` at ``t`` (not before now); the entry returned can be passed to ``cancel``."""
        e: Event = [max(t, self.now), next(self._seq), fn, args]
        heapq.heappush(self._q, e)
        return e

    def cancel(self, e: Event) -> None:
        """``e`` will not run (its slot in the heap is dropped when popped or at the next compaction)."""
        if e[2] is None:
            return
        e[2] = None
        e[3] = ()
        self.cancelled += 1
        q = self._q
        if self.cancelled > self.COMPACT_MIN and 2 * self.cancelled > len(q):
            q[:] = [x for x in q if x[2] is not None]  # in place: run() holds this list
            heapq.heapify(q)  # (time, seq) keys are unique: the live events keep their order
            self.cancelled = 0

    def pending(self) -> int:
        """Live events in the queue."""
        return len(self._q) - self.cancelled

    def run(self, until: float, stop: Callable[[], bool] = lambda: False) -> None:
        q = self._q
        if self.after_batch is not None:
            self.after_batch()  # flows started before the loop ran
        while q and q[0][0] <= until:
            t, _, fn, args = heapq.heappop(q)
            if fn is None:
                self.cancelled -= 1
                continue
            self.now = t
            self.events += 1
            fn(*args)
            # Rates are settled once per instant, after every event at that time.
            if self.after_batch is not None and (not q or q[0][0] > t):
                self.after_batch()
                if stop():
                    return


class Host:
    """Several downlinks on one machine: their sum is capped at ``cap`` bytes/s (shared equally while active)."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.links: list[Link] = []
        self.active = 0


class Link:
    """One capacity in bytes/s: a node's uplink or downlink, or the origin's uplink."""

    __slots__ = ("bytes", "cap", "flows", "host", "name")

    def __init__(self, name: str, cap: float, host: Host | None = None) -> None:
        self.name = name
        self.cap = cap
        self.flows: dict[Flow, None] = {}  # insertion order: runs repeat exactly
        self.host = host
        self.bytes = 0.0  # bytes carried so far (finished and aborted flows)
        if host is not None:
            host.links.append(self)

    def effective(self) -> float:
        h = self.host
        if h is None or not h.active:
            return self.cap
        return min(self.cap, h.cap / h.active)


class Flow:
    __slots__ = ("done", "dst", "ev", "left", "rate", "share", "src", "t", "ver")

    def __init__(self, src: Link, dst: Link, nbytes: float, done: Callable[[], None], now: float) -> None:
        self.src, self.dst, self.left, self.done = src, dst, float(nbytes), done
        self.rate = 0.0
        self.share = 0.0
        self.t = now
        self.ver = 0
        self.ev: Event | None = None  # the pending finish event

    def advance(self, now: float) -> float:
        """Account the bytes moved since the last rate change; returns them."""
        moved = min(self.left, self.rate * (now - self.t))
        self.left -= moved
        self.t = now
        self.src.bytes += moved
        self.dst.bytes += moved
        return moved


def waterfill(cap: float, demands: list[tuple[Flow, float]]) -> list[tuple[Flow, float]]:
    """Max-min fair split of ``cap`` among demands."""
    out = []
    left, k = cap, len(demands)
    for f, d in sorted(demands, key=lambda x: x[1]):
        share = left / k
        r = d if d < share else share
        out.append((f, r))
        left -= r
        k -= 1
    return out


class Net:
    """The flows in progress and their rates (see the module docstring).

    A *crowded* source (``CROWD`` flows or more: an origin that thousands of nodes fetch from at
    once) is not re-split on every change, which would re-time all its flows each time (O(F) per
    change, O(F²) per run): its changes wait until they reach ``CROWD_FRACTION`` of its flows, or
    ``CROWD_DELAY`` seconds after the first of them. Meanwhile a flow that started there has no
    share (it waits), and the capacity of one that ended stays unused: feasible, and slow by at
    most ``CROWD_DELAY`` per flow, where one flow of F takes F times its piece time.
    """

    CROWD = 256
    CROWD_FRACTION = 0.01
    CROWD_DELAY = 1.0

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self._dirty_src: set[Link] = set()
        self._dirty_dst: set[Link] = set()
        self._crowd: dict[Link, int] = {}  # crowded source -> changes waiting for its re-split
        loop.after_batch = self.settle

    def start(self, src: Link, dst: Link, nbytes: float, done: Callable[[], None]) -> Flow:
        f = Flow(src, dst, nbytes, done, self.loop.now)
        self._host_change(dst, +1)
        src.flows[f] = None
        dst.flows[f] = None
        self._touch(f)
        return f

    def abort(self, f: Flow) -> None:
        """End ``f`` early (cancelled request, lost peer); the bytes it moved still count."""
        if f not in f.src.flows:
            return
        f.advance(self.loop.now)
        self._remove(f)

    def _remove(self, f: Flow) -> None:
        f.ver += 1
        if f.ev is not None:
            self.loop.cancel(f.ev)
            f.ev = None
        f.src.flows.pop(f, None)
        f.dst.flows.pop(f, None)
        self._host_change(f.dst, -1)
        self._touch(f)

    def _host_change(self, dst: Link, delta: int) -> None:
        h = dst.host
        if h is None:
            return
        if not dst.flows:  # called before a first flow is added, after the last is removed
            h.active += delta
            self._dirty_dst.update(h.links)
            for link in h.links:
                for g in link.flows:
                    self._dirty_src.add(g.src)

    def _touch(self, f: Flow) -> None:
        # Only the two ends re-split. The other sources sending to f.dst keep
        # the demand hint they had (so their split may lag until their own
        # flows change): that costs efficiency, never feasibility, and keeps
        # an event at one node from re-splitting the origin's every flow.
        self._dirty_dst.add(f.dst)
        s = f.src
        if len(s.flows) < self.CROWD:
            self._dirty_src.add(s)
            return
        n = self._crowd.get(s, 0) + 1
        if n == 1:
            self.loop.at(self.loop.now + self.CROWD_DELAY, self._crowd_due, s)
        if n >= self.CROWD_FRACTION * len(s.flows):
            self._crowd.pop(s, None)
            self._dirty_src.add(s)
        else:
            self._crowd[s] = n

    def _crowd_due(self, s: Link) -> None:
        if self._crowd.pop(s, None) is not None:
            self._dirty_src.add(s)

    def settle(self) -> None:
        if not self._dirty_src and not self._dirty_dst:
            return
        now = self.loop.now
        dsts = self._dirty_dst
        for s in self._dirty_src:
            if not s.flows:
                continue
            demands = [(g, g.dst.effective() / len(g.dst.flows)) for g in s.flows]
            for g, r in waterfill(s.cap, demands):
                if r != g.share:
                    g.share = r
                    dsts.add(g.dst)
        self._dirty_src = set()
        self._dirty_dst = set()
        for d in dsts:
            if not d.flows:
                continue
            for g, r in waterfill(d.effective(), [(g, g.share) for g in d.flows]):
                if r != g.rate:
                    g.advance(now)
                    g.rate = r
                    g.ver += 1
                    if g.ev is not None:
                        self.loop.cancel(g.ev)
                        g.ev = None
                    if r > 0:
                        g.ev = self.loop.at(now + g.left / r, self._finish, g, g.ver)

    def _finish(self, f: Flow, ver: int) -> None:
        if ver != f.ver:
            return
        f.ev = None
        f.advance(self.loop.now)
        f.src.bytes += f.left  # rounding: the flow ends exactly at its size
        f.dst.bytes += f.left
        f.left = 0.0
        self._remove(f)
        f.done()
