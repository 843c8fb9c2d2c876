"""A node behind NAT fetches from and serves to the swarm: real namespaces, iptables MASQUERADE, real processes.

The topology and the scenario are bench/nat_bench.py's (a public segment
with a bootstrap node, a seeder and public leeches; a NAT namespace; a
private segment with one node). The NATed node must finish a byte-identical
copy, and a public node that joins after every other holder has stopped must
get every byte from the NATed node, over connections the NATed node dialled
back (a direct dial to it cannot work behind the NAT).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import nat_bench  # noqa: E402
from _harness import cleanup, make_model  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _why_not() -> str | None:
    why = nat_bench.nat_unavailable()
    if why:
        return why
    probe = f"nat{os.getpid() % 10000}p"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"cannot create network namespaces here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


WHY = _why_not()


@pytest.mark.skipif(WHY is not None, reason=f"NAT topology unavailable: {WHY}")
def test_natted_node_fetches_and_serves(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model", "4MiB", name="nat")
    assert model.manifest is not None, model.error
    net = nat_bench.NatNet(f"nat{os.getpid() % 10000}")
    try:
        net.up()
        assert net.check() is None, net.check()
        run = nat_bench.run_scenario(net, model, tmp_path, timeout=120, leeches=1)
    finally:
        cleanup()
    natted = run.peer_ids["natted"]
    assert run.identical == {"natted": True, "leech0": True}
    fetch, only, serving = run.rows
    # The NATed node dialled out: its own fetch took the direct path.
    assert fetch["paths"]["bytes"]["direct"] == model.total_size
    # The last public node found only the NATed node holding the model: every byte
    # came from it, over reverse-dialled connections, after the direct dial failed.
    assert only["by_source"] == {f"peer:{natted}": model.total_size}
    assert only["paths"]["bytes"] == {"direct": 0, "reverse": model.total_size, "libp2p": 0, "relayed": 0}
    assert only["paths"]["failed"]["direct"] >= 1
    assert serving["paths"]["served_by_reverse_dial"] >= 1
