"""Two nodes behind two different NATs: real namespaces, iptables MASQUERADE, real ``join`` processes.

Every test here is bench/nat_bench.py's ``run_two_nats``: a relay (``join
--relay``) on the public segment; NATed node A takes the model from an HTTP mirror
that then stops; NATed node B, behind the other NAT, must get every byte from A.
Neither can dial the other (the topology check proves it before any node starts).

- Symmetric NATs that reset (Linux MASQUERADE --random-fully), relay on the
  bootstrap node: nobody can be dialled back and no hole punch can work (each
  connection leaves from a fresh random port, so the address the relay saw is never
  the one a punch needs), so every byte must come over a peerwire stream on the
  relayed libp2p connection. (With Linux's default port-preserving MASQUERADE a
  punch whose SYNs cross can succeed even on NATs that reset: CI saw it once.)
- NATs that drop unsolicited packets (``NatNet(silent=True)``, as a home router
  does): B first reaches A through the relay; then both punch (DCUtR: simultaneous
  dials from their listen ports) and every piece must cross the direct connection:
  the test fails if any piece byte went through the relay, or if the relay copied
  as much as the model. Robust under load by the product's own retries, not the
  test's: py-libp2p dials in up to 3 rounds per attempt, and node/_relays.py waits
  up to 30 s for a direct connection, taking further attempts while time remains,
  before it falls back to the relay.
- Relays beyond the bootstrap peers (``relay_apart=True``): the bootstrap node
  relays nothing; the relay is another public node that bootstraps from it, so A
  and B (behind symmetric NATs) can learn of it only from its DHT provider record.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import nat_bench  # noqa: E402
from _harness import cleanup, make_model  # noqa: E402

from .test_nat_topology import WHY  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _two_nats(tmp_path: Path, silent: bool = False, relay_apart: bool = False, symmetric: bool = False) -> tuple[Any, Any]:
    """A 2 MiB model moved from NATed A to NATed B (run_two_nats); the model and the run's report."""
    model = make_model(tmp_path / "model", "2MiB", name="nat")
    assert model.manifest is not None, model.error
    net = nat_bench.NatNet(f"nat{os.getpid() % 10000}", segments=2, silent=silent, symmetric=symmetric)
    try:
        net.up()
        assert net.check() is None, net.check()
        run = nat_bench.run_two_nats(net, model, tmp_path, timeout=150, public_leech=False,
                                     relay_apart=relay_apart)
    finally:
        cleanup()
    return model, run


@pytest.mark.skipif(WHY is not None, reason=f"NAT topology unavailable: {WHY}")
def test_two_natted_nodes_exchange_a_model_through_a_relay(tmp_path: Path) -> None:
    model, run = _two_nats(tmp_path, symmetric=True)
    nat_a = run.peer_ids["natA"]
    assert run.identical == {"natA": True, "natB": True}
    _a_fetch, b_fetch, a_serving, _b_serving, relay = run.rows
    # A was the only holder: every byte B got is A's, and all of it came over the relayed path.
    assert b_fetch["by_source"] == {f"peer:{nat_a}": model.total_size}
    assert b_fetch["paths"]["bytes"] == {"direct": 0, "reverse": 0, "libp2p": 0, "relayed": model.total_size}
    assert b_fetch["paths"]["connections"]["relayed"] >= 1
    assert a_serving["paths"]["served_relayed"] >= 1
    # The bytes crossed the relay (its copy loop counts them), and the relay fetched nothing itself.
    swarm = relay["status"].get("swarm", relay["status"])
    assert swarm["relay"]["relayed_bytes"] >= model.total_size
    assert swarm["down_bytes"] == 0


@pytest.mark.skipif(WHY is not None, reason=f"NAT topology unavailable: {WHY}")
def test_two_natted_nodes_move_a_model_over_a_hole_punched_connection(tmp_path: Path) -> None:
    model, run = _two_nats(tmp_path, silent=True)
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


@pytest.mark.skipif(WHY is not None, reason=f"NAT topology unavailable: {WHY}")
def test_natted_nodes_find_a_relay_in_the_dht(tmp_path: Path) -> None:
    model, run = _two_nats(tmp_path, relay_apart=True, symmetric=True)
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
