"""Relays beyond the bootstrap peers: NATed nodes find a relay in the DHT and reach each other through it.

Real namespaces, iptables MASQUERADE, real ``join`` processes: bench/nat_bench.py's
``run_two_nats(relay_apart=True)``. The bootstrap node relays nothing; the relay
(``join --relay``) is another public node that bootstraps from it, so NATed nodes A
and B (behind two NATs that reset, where no hole punch works) can learn of it only
from its DHT provider record. B must get every byte of the model from A through
that relay.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import nat_bench  # noqa: E402
from _harness import cleanup, make_model  # noqa: E402

from .test_nat_topology import WHY  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.mark.skipif(WHY is not None, reason=f"NAT topology unavailable: {WHY}")
def test_natted_nodes_find_a_relay_in_the_dht(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model", "2MiB", name="nat")
    assert model.manifest is not None, model.error
    net = nat_bench.NatNet(f"nat{os.getpid() % 10000}", segments=2)
    try:
        net.up()
        assert net.check() is None, net.check()
        run = nat_bench.run_two_nats(net, model, tmp_path, timeout=150, public_leech=False, relay_apart=True)
    finally:
        cleanup()
    nat_a, relay_id = run.peer_ids["natA"], run.peer_ids["relay"]
    assert run.identical == {"natA": True, "natB": True}
    _a_fetch, b_fetch, a_serving, b_serving, relay = run.rows
    # Both NATed nodes hold a reservation at the relay the DHT named, and only there
    # (their bootstrap peer refused: it relays nothing).
    for serving in (a_serving, b_serving):
        st = serving["status"].get("swarm", serving["status"])
        assert st["relay"]["reserved_at"] == [relay_id]
    # Every byte B got is A's, over peerwire on the circuit through that relay.
    assert b_fetch["by_source"] == {f"peer:{nat_a}": model.total_size}
    assert b_fetch["paths"]["bytes"] == {"direct": 0, "reverse": 0, "libp2p": 0, "relayed": model.total_size}
    swarm = relay["status"].get("swarm", relay["status"])
    assert swarm["relay"]["relayed_bytes"] >= model.total_size
    assert swarm["down_bytes"] == 0
