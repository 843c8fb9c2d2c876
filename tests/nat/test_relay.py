"""Two nodes behind two different NATs exchange a model through a relay: real namespaces, iptables MASQUERADE, real processes.

The topology and the scenario are bench/nat_bench.py's ``run_two_nats``:
a relay (``join --relay``, the bootstrap peer) on the public segment; NATed
node A takes the model from an HTTP mirror that then stops; NATed node B,
behind the other NAT, must get every byte from A. Neither can dial the other
(the check proves it before any node starts) nor be dialled back, so every
byte must come over a peerwire stream on the relayed libp2p connection.
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
def test_two_natted_nodes_exchange_a_model_through_a_relay(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model", "2MiB", name="nat")
    assert model.manifest is not None, model.error
    net = nat_bench.NatNet(f"nat{os.getpid() % 10000}", segments=2)
    try:
        net.up()
        assert net.check() is None, net.check()
        run = nat_bench.run_two_nats(net, model, tmp_path, timeout=150, public_leech=False)
    finally:
        cleanup()
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

