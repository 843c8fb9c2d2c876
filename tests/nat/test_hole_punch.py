"""Two nodes behind two NATs that drop unsolicited packets get a hole-punched connection and move a model over it.

Real namespaces, iptables MASQUERADE, real ``join`` processes: bench/nat_bench.py's
``run_two_nats`` with ``NatNet(silent=True)`` (each NAT drops new connections to
its outside address, as a home router does). NATed node A takes the model from an
HTTP mirror that then stops; NATed node B, behind the other NAT, must get every
byte from A. Neither can dial the other (the topology check proves it), so B first
reaches A through the relay; then both punch (DCUtR: simultaneous dials from their
listen ports) and every piece must cross the direct connection: the test fails if
any piece byte went through the relay, or if the relay copied as much as the model.

Robust under load by the product's own retries, not the test's: py-libp2p dials in
up to 3 rounds per attempt, and node/_relays.py waits up to 30 s for a direct
connection, taking further attempts while time remains, before it falls back to the
relay.
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
def test_two_natted_nodes_move_a_model_over_a_hole_punched_connection(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model", "2MiB", name="nat")
    assert model.manifest is not None, model.error
    net = nat_bench.NatNet(f"nat{os.getpid() % 10000}", segments=2, silent=True)
    try:
        net.up()
        assert net.check() is None, net.check()
        run = nat_bench.run_two_nats(net, model, tmp_path, timeout=150, public_leech=False)
    finally:
        cleanup()
    nat_a = run.peer_ids["natA"]
    assert run.identical == {"natA": True, "natB": True}
    _a_fetch, b_fetch, a_serving, b_serving, relay = run.rows
    # A was the only holder; every byte B got is A's, and all of it came over a direct
    # libp2p connection (the "libp2p" path: peerwire on a connection that is not relayed).
    assert b_fetch["by_source"] == {f"peer:{nat_a}": model.total_size}
    assert b_fetch["paths"]["bytes"] == {"direct": 0, "reverse": 0, "libp2p": model.total_size, "relayed": 0}
    assert b_fetch["paths"]["connections"]["relayed"] == 0
    assert a_serving["paths"]["served_relayed"] >= 1  # peerwire over libp2p, served by A
    # The direct connection came from a hole punch: B reached A through the relay first.
    a_relay, b_relay = (r["status"].get("swarm", r["status"])["relay"] for r in (a_serving, b_serving))
    assert a_relay["relayed_dials"] + b_relay["relayed_dials"] >= 1
    assert a_relay["hole_punched"] + b_relay["hole_punched"] >= 1
    # The relay carried the control session and the DCUtR exchange, not the model.
    swarm = relay["status"].get("swarm", relay["status"])
    assert swarm["relay"]["relayed_bytes"] < model.total_size // 4
    assert swarm["down_bytes"] == 0
