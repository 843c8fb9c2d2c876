"""bench/sim/kad.py: the Kademlia lookup model runs our lookup and finds every provider in a healthy network."""

from __future__ import annotations

import argparse
import random

from bench.sim import kad


def test_tables_hold_k_per_bucket_and_every_lookup_finds_the_provider() -> None:
    rng = random.Random(3)
    net = kad.build(500, 20, rng)
    assert all(i not in t for i, t in enumerate(net.tables))
    assert min(len(t) for t in net.tables) >= 20  # at least the far bucket's k
    args = argparse.Namespace(rtt=0.05, dial_rtts=3, silent=0.0)
    results = [kad.one_lookup(net, rng, args) for _ in range(30)]
    assert all(found for found, _, _, _ in results)
    assert max(hops for _, _, hops, _ in results) <= 4  # log2(500) / log2(20) rounds, rounded up, plus one
    assert all(latency < 2.0 for _, _, _, latency in results)


def test_silent_peers_cost_query_timeouts() -> None:
    rng = random.Random(4)
    net = kad.build(300, 20, rng)
    args = argparse.Namespace(rtt=0.05, dial_rtts=3, silent=0.5)
    results = [kad.one_lookup(net, random.Random(s), args) for s in range(20)]
    # Half the peers silent: some lookup waits out a 5 s query timeout, none runs past the 15 s budget.
    assert max(latency for _, _, _, latency in results) >= 5.0
    assert all(latency <= 15.0 for _, _, _, latency in results)
