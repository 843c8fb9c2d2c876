"""The relay's reservation budget (node/_relays.py RelayBudget) with real libp2p hosts on 127.0.0.1."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import trio

from autoglm.node._p2p import RelayBudget, open_p2p
from autoglm.node._relays import MAX_RELAYS


async def test_reservations_are_bounded_and_renewable(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_p2p(tmp_path / "r", relay=RelayBudget(reservations=1)) as relay:
            addr = relay.addrs()[0]
            async with open_p2p(tmp_path / "b", bootstrap=[addr]) as b, open_p2p(tmp_path / "c", bootstrap=[addr]) as c:
                assert await b.reserve(relay.peer_id)
                assert b.relays == [relay.peer_id]
                # The one slot is b's: c is refused, b renews it.
                assert not await c.reserve(relay.peer_id)
                assert c.relays == []
                assert await b.reserve(relay.peer_id)


async def test_a_node_without_relay_refuses_reservations(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_p2p(tmp_path / "r") as plain, open_p2p(tmp_path / "b", bootstrap=[plain.addrs()[0]]) as b:
            assert not await b.reserve(plain.peer_id)
            assert b.relays == []


async def test_relays_are_found_in_the_dht_and_reserved_up_to_k(tmp_path: Path) -> None:
    """A ``join --relay`` node advertises itself (a provider record); a node that is no relay does not.

    Reservations stop at MAX_RELAYS however many relays are found.
    """
    with trio.fail_after(120):
        async with open_p2p(tmp_path / "boot") as boot, AsyncExitStack() as stack:
            addr = boot.addrs()[0]
            relays = [await stack.enter_async_context(open_p2p(tmp_path / f"r{i}", bootstrap=[addr], relay=RelayBudget()))
                      for i in range(MAX_RELAYS + 1)]
            c = await stack.enter_async_context(open_p2p(tmp_path / "c", bootstrap=[addr]))
            found = await c.find_relays()
            assert sorted(found) == sorted(r.peer_id for r in relays)
            assert c.relay is not None
            await c.relay.reserve_round([boot.peer_id, *found])
            assert len(c.relays) == MAX_RELAYS
            assert set(c.relays) <= set(found)
