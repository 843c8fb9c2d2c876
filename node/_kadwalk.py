"""Drive one :class:`~autoglm.protocol._kadlookup.Lookup` with real queries (trio).

The state machine decides whom to ask and when the walk is over; this pump
starts its queries, each bounded by the lookup's ``query_timeout``, reports
every outcome back, and wakes up at the lookup's next deadline. It knows
nothing of libp2p: ``ask(peer)`` (node/_kadclient.py) sends one FIND_NODE or
GET_PROVIDERS and returns the closer peers as (id, point) pairs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import trio

from autoglm.node.errors import AutoglmError
from autoglm.protocol._kadlookup import Lookup

__all__ = ["Ask", "run_lookup"]

log = logging.getLogger(__name__)

Ask = Callable[[str], Awaitable[Iterable[tuple[str, bytes]]]]


async def run_lookup(lookup: Lookup, ask: Ask) -> None:
    """Run ``lookup`` to its end (it bounds its own time by ``budget``)."""
    wake = trio.Event()

    async def one(peer: str) -> None:
        closer: Iterable[tuple[str, bytes]] | None = None
        t0 = trio.current_time()
        with trio.move_on_after(lookup.params.query_timeout):
            try:
                closer = await ask(peer)
            except AutoglmError as exc:
                log.debug("DHT query to %s failed: %r", peer, exc)
        now = trio.current_time()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("DHT query to %s %s after %.2f s", peer, "gave nothing" if closer is None else "answered", now - t0)
        if closer is None:
            lookup.on_failure(peer, now)
        else:
            lookup.on_response(peer, closer, now)
        wake.set()

    async with trio.open_nursery() as nursery:
        while True:
            now = trio.current_time()
            lookup.handle_timer(now)
            if lookup.done:
                break
            wake = trio.Event()
            for peer in lookup.next_queries(now):
                nursery.start_soon(one, peer)
            with trio.move_on_at(lookup.next_deadline()):
                await wake.wait()
        nursery.cancel_scope.cancel()
