#!/usr/bin/env python3
"""Kademlia provider lookups at 1,000-10,000 nodes, with our real lookup code.

The lookup is ``protocol/_kadlookup.Lookup``, the state machine the node's
DHT walks run (node/_kadclient.py), with the node's parameters (alpha 3, k 20,
beta 3, 5 s per query, 15 s per lookup). Only the network is simulated:

- N nodes with random 256-bit points; each routing table holds up to k
  random peers per bucket (shared-prefix length with the node), the table a
  node converges to after its self-lookup and refreshes.
- A server answers GET_PROVIDERS as py-libp2p's does: the k peers of its
  table closest to the key, and the provider if it holds the record.
- The provider record sits on the k nodes closest to the key (a provide
  that reached them all).
- Each query costs one round trip drawn from a log-normal around ``--rtt``,
  plus the connection set-up (TCP + Noise XX + multistream: ``--dial-rtts``
  round trips) when the querier has not talked to that peer yet, which in a
  lookup through a large network is nearly always; ``--silent`` of the peers
  never answer (churn), costing their 5 s query timeout.

Outputs per N: the share of lookups that found the provider, queries per
lookup, hops (how many answers away from the seeds the closest answering
peer was), and the lookup's latency p50/p90.

    .venv/bin/python bench/sim/kad.py --nodes 64 1000 10000 --lookups 200
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
import sys
from dataclasses import dataclass

from autoglm.protocol._kadlookup import Lookup, LookupParams

PARAMS = LookupParams()  # the node's own (node/_kadclient.py _LOOKUP)
BITS = 256


@dataclass
class Net:
    points: list[int]  # node i's point
    tables: list[list[int]]  # node i's routing table (node indices)


def build(n: int, k: int, rng: random.Random) -> Net:
    points = [rng.getrandbits(BITS) for _ in range(n)]
    order = sorted(range(n), key=points.__getitem__)
    sorted_points = [points[i] for i in order]
    tables: list[list[int]] = []
    for i in range(n):
        p = points[i]
        table: list[int] = []
        for depth in range(BITS):
            # Bucket `depth`: the peers sharing `depth` leading bits with p and differing at the next:
            # one contiguous range of the sorted points.
            flip = p ^ (1 << (BITS - 1 - depth))
            lo_val = (flip >> (BITS - 1 - depth)) << (BITS - 1 - depth)
            hi_val = lo_val + (1 << (BITS - 1 - depth))
            lo = bisect.bisect_left(sorted_points, lo_val)
            hi = bisect.bisect_left(sorted_points, hi_val)
            if hi > lo:
                span = order[lo:hi]
                table += span if len(span) <= k else rng.sample(span, k)
            # Once the prefix is this long nobody else shares it; the rest are empty.
            same_lo = bisect.bisect_left(sorted_points, (p >> (BITS - 1 - depth)) << (BITS - 1 - depth))
            same_hi = bisect.bisect_left(sorted_points, ((p >> (BITS - 1 - depth)) + 1) << (BITS - 1 - depth))
            if same_hi - same_lo <= 1:
                break
        tables.append(table)
    return Net(points, tables)


def _pt(x: int) -> bytes:
    return x.to_bytes(32, "big")


def one_lookup(net: Net, rng: random.Random, args: argparse.Namespace) -> tuple[bool, int, int, float]:
    n = len(net.points)
    key = rng.getrandbits(BITS)
    holders = set(sorted(range(n), key=lambda j: net.points[j] ^ key)[: PARAMS.k])
    silent = {j for j in range(n) if rng.random() < args.silent}
    me = rng.randrange(n)
    seeds = sorted(net.tables[me], key=lambda j: net.points[j] ^ key)[: PARAMS.k]
    # A provider walk as node/_kadclient.py runs it: full (k closest) until it has a provider.
    lookup = Lookup(_pt(key), [(str(j), _pt(net.points[j])) for j in seeds], 0.0, PARAMS, exclude=[str(me)],
                    need=PARAMS.k)
    depth = {j: 0 for j in seeds}
    sigma = 0.5
    mu = math.log(args.rtt)
    now = 0.0
    pending: dict[str, float] = {}
    found = False
    found_at = math.inf
    while True:
        lookup.handle_timer(now)
        if lookup.done:
            break
        for peer in lookup.next_queries(now):
            if int(peer) not in silent:
                rtts = 1 + args.dial_rtts
                pending[peer] = now + sum(rng.lognormvariate(mu, sigma) for _ in range(rtts))
        if not pending and lookup.in_flight() == 0:
            break
        now = min([lookup.next_deadline(), *pending.values()])
        for peer, at in sorted(pending.items(), key=lambda x: x[1]):
            if at > now:
                continue
            del pending[peer]
            j = int(peer)
            answer = sorted((x for x in net.tables[j] if x != j), key=lambda x: net.points[x] ^ key)[: PARAMS.k]
            for x in answer:
                depth.setdefault(x, depth[j] + 1)
            if j in holders and not found:
                found, found_at = True, at
                lookup.found(1, PARAMS.k)
            lookup.on_response(peer, [(str(x), _pt(net.points[x])) for x in answer], at)
    closest = lookup.closest(1)
    hops = depth[int(closest[0])] + 1 if closest else 0
    return found, lookup.queries, hops, (found_at if found else now)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[64, 1000, 10000])
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--rtt", type=float, default=0.05, help="median round trip, seconds (log-normal, sigma 0.5)")
    ap.add_argument("--dial-rtts", type=int, default=3, help="extra round trips to set up a connection per query")
    ap.add_argument("--silent", type=float, default=0.1, help="share of peers that never answer (churn)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(f"alpha {PARAMS.alpha}, k {PARAMS.k}, beta {PARAMS.beta}, query timeout {PARAMS.query_timeout:g} s, "
          f"budget {PARAMS.budget:g} s; rtt {1000 * args.rtt:g} ms median, {args.dial_rtts} set-up RTTs per query, "
          f"{100 * args.silent:g} % silent peers")
    print("| nodes | found | queries p50 / p90 | hops p50 / max | time to provider p50 / p90 |")
    print("|---|---|---|---|---|")
    for n in args.nodes:
        rng = random.Random(args.seed)
        net = build(n, PARAMS.k, rng)
        res = [one_lookup(net, rng, args) for _ in range(args.lookups)]
        found = [r for r in res if r[0]]
        q = [float(r[1]) for r in res]
        hops = [float(r[2]) for r in res]
        lat = [r[3] for r in found] or [math.nan]
        print(f"| {n:,} | {len(found)}/{len(res)} | {_pct(q, .5):.0f} / {_pct(q, .9):.0f} | "
              f"{_pct(hops, .5):.0f} / {max(hops):.0f} | {1000 * _pct(lat, .5):.0f} ms / {1000 * _pct(lat, .9):.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
