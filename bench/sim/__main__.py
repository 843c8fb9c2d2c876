"""``python -m bench.sim``: the swarm simulator's validation table and fleet runs (docs/simulation.md).

    python -m bench.sim validate                 # N=4, 8, 16 against the measured loopback runs
    python -m bench.sim fleet --n 1000 --size 10GiB --piece 64MiB [--spread 600] [--churn 0.2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time

from autoglm.protocol._ownership import FirstCopy

from ._scenario import Fleet, Gbit, GiB, Mbit, MiB, Result, Scenario, run
from ._swarm import Params

# docs/benchmarks.md, "Swarm (issue #4)" (commit 8300959) and "Swarm after the restructure"
# (6ab3abc): autoglm join + fetch, 1 GiB, 50 MiB/s aggregate cap; (time s, origin egress ×).
MEASURED = {4: [(22.1, 1.00), (22.4, 1.00)], 8: [(22.5, 1.00), (22.7, 1.00)], 16: [(35.5, 1.03), (47.1, 1.35)]}

# The loopback benchmark as the simulator sees it (each number from docs/benchmarks.md):
# htb lets 0.952 of the cap through as payload; daemons start fetching 0.27-0.65 s after t=0
# (median ~0.45); a loopback peerwire connection moves 1.4-2.8 GB/s; the 2 cores spend
# ~4.0 CPU-s per GiB a node receives (CPU/node at N=16), so all nodes together receive at most
# 2 / 4.0 GiB/s.
LOOPBACK_ORIGIN = 0.952 * 50 * MiB
LOOPBACK_LINK = 1.4e9
LOOPBACK_START = 0.45
LOOPBACK_HOST = 2 / (4.0 / GiB)


def _size(s: str) -> int:
    units = {"KiB": 1 << 10, "MiB": MiB, "GiB": GiB, "TiB": 1 << 40}
    for u, m in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


def loopback(n: int, seed: int = 1, deliver_timeout: float | None = None, wire: bool = True) -> Scenario:
    return Scenario(
        f"loopback-{n}", (Fleet(n, LOOPBACK_LINK, LOOPBACK_LINK),), origin=LOOPBACK_ORIGIN, size=GiB,
        host_cpu=LOOPBACK_HOST, seed=seed,
        params=Params(start_delay=LOOPBACK_START, latency=0.0002, origin_rtt=0.0004, deliver_timeout=deliver_timeout, wire=wire),
    )


def fleet(n: int, size: int, piece: int, servers: float, spread: float, churn: float, degree: int | None, seed: int,
          deliver_timeout: float | None, wire: bool, owner_timeout: float | None = None, sched_tick: float = 0.05,
          gossip: float | None = None, max_scale: float | None = None, pace_factor: float | None = None,
          endgame_copies: int | None = None, finish_on_choke: bool = False) -> Scenario:
    """Servers at 10 Gbit/s, edge devices at 20-100 Mbit/s (symmetric), a 1 Gbit/s origin; WAN-ish latencies."""
    ns = int(round(servers * n))
    fleets = (Fleet(ns, 10 * Gbit, 10 * Gbit), Fleet(n - ns, 20 * Mbit, 20 * Mbit, down_hi=100 * Mbit, up_hi=100 * Mbit))
    # A piece takes 0.7-3.4 s at edge speeds: waking the scheduler at most every 50 ms per node changes nothing there.
    params = Params(latency=0.010, origin_rtt=0.100, start_delay=0.5, deliver_timeout=deliver_timeout, wire=wire,
                    sched_tick=sched_tick, gossip=gossip, max_scale=max_scale, pace_factor=pace_factor,
                    finish_on_choke=finish_on_choke)
    if owner_timeout is not None:
        params = dataclasses.replace(params, owner_timeout=owner_timeout)
    if endgame_copies is not None:
        params = dataclasses.replace(params, endgame_copies=endgame_copies)
    name = f"fleet-{n}-{'spread' if spread else 'once'}-churn{int(churn * 100)}"
    return Scenario(name, tuple(f for f in fleets if f.count), origin=1 * Gbit, size=size, piece=piece,
                    arrival_spread=spread, churn=churn, degree=degree, params=params, seed=seed)


def _md(rows: list[dict[str, object]], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def cmd_validate(args: argparse.Namespace) -> int:
    rows = []
    for n in args.n:
        r = run(loopback(n, args.seed, args.deliver_timeout))
        lo = min(t for t, _ in MEASURED.get(n, [(float("nan"), 0)]))
        hi = max(t for t, _ in MEASURED.get(n, [(float("nan"), 0)]))
        meas_t = f"{lo}–{hi} s" if lo != hi else f"{lo} s"
        meas_e = "–".join(sorted({f"{e:.2f}×" for _, e in MEASURED.get(n, [])}))
        err = min(abs(r.last - t) / t for t, _ in MEASURED[n]) if n in MEASURED else float("nan")
        rows.append({
            "N": n, "measured time": meas_t, "simulated": f"{r.last:.1f} s", "error": f"{err * 100:+.1f} %".replace("+", ""),
            "measured egress": meas_e, "simulated egress": f"{r.egress:.2f}×", "fluid bound": f"{r.bound:.1f} s",
            "sim wall": f"{r.wall:.1f} s",
        })
        print(json.dumps(r.row()), file=sys.stderr)
    print(_md(rows, list(rows[0])))
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    sc = fleet(args.n, _size(args.size), _size(args.piece), args.servers, args.spread, args.churn, args.degree,
               args.seed, args.deliver_timeout, not args.no_wire, args.owner_timeout, args.sched_tick,
               None if args.gossip < 0 else args.gossip, args.max_scale, args.pace_factor, args.endgame_copies,
               args.finish_on_choke)
    t = time.time()
    r: Result = run(sc, args.horizon)
    row = r.row()
    row["wall_clock_s"] = round(time.time() - t, 1)
    print(json.dumps(row))
    return 0 if r.completed == r.n else 1


def owner_counts(n: int, degree: int, pieces: int, seed: int = 1, gossip: bool = False) -> tuple[list[int], float]:
    """For each piece, how many nodes think they own it (FirstCopy over each node's ~``degree`` sessions); mean sessions.

    ``gossip``: the other fetchers are relayed members (FirstCopy ``set_members(..., relayed=...)``).
    """
    rng = random.Random(seed)
    ids = [f"n{k:05d}" for k in range(n)]
    nb: dict[str, set[str]] = {a: set() for a in ids}
    for a in ids:
        for b in rng.sample(ids, min(n, degree // 2 + 1)):
            if a != b:
                nb[a].add(b)
                nb[b].add(a)
    owners = [0] * pieces
    sizes = [8 * MiB] * pieces
    for a in ids:
        fc = FirstCopy(a, sizes)
        fc.set_members(nb[a], 0.0, relayed=set(ids) - nb[a] if gossip else ())
        for i in range(pieces):
            if fc.owner(i) == a:
                owners[i] += 1
    return owners, sum(map(len, nb.values())) / n


def cmd_owners(args: argparse.Namespace) -> int:
    """How many nodes think they own each piece when each sees only its own sessions (no time, no links)."""
    rows = []
    for n in args.n:
        owners, mean = owner_counts(n, args.degree, args.pieces, args.seed, args.gossip)
        rows.append({
            "N": n, "sessions per node": round(mean, 1), "pieces": args.pieces,
            "owned by nobody": owners.count(0), "owned by several": sum(1 for o in owners if o > 1),
            "first copies if every owner fetches": f"{sum(owners) / args.pieces:.2f}×",
        })
    print(_md(rows, list(rows[0])))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="simulate the loopback benchmark at N=4, 8, 16 and compare")
    v.add_argument("--n", type=int, nargs="+", default=[4, 8, 16])
    v.add_argument("--seed", type=int, default=1)
    v.add_argument("--deliver-timeout", type=float, default=None, help="what-if: FirstCopy deliver_timeout (s)")
    v.set_defaults(fn=cmd_validate)
    f = sub.add_parser("fleet", help="a heterogeneous fleet: servers 10 Gbit/s, edge 20-100 Mbit/s, origin 1 Gbit/s")
    f.add_argument("--n", type=int, default=1000)
    f.add_argument("--size", default="10GiB")
    f.add_argument("--piece", default="64MiB", help="piece size (fixed pieces; the real maximum is 8MiB)")
    f.add_argument("--servers", type=float, default=0.2, help="fraction of 10 Gbit/s servers (default 0.2)")
    f.add_argument("--spread", type=float, default=0.0, help="arrivals uniform over this many seconds")
    f.add_argument("--churn", type=float, default=0.0, help="fraction of nodes that leave mid-fetch (each replaced)")
    f.add_argument("--degree", type=int, default=32, help="sessions per node (warm_sessions is 32); 0: full mesh")
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--deliver-timeout", type=float, default=None, help="what-if: FirstCopy deliver_timeout (s)")
    f.add_argument("--owner-timeout", type=float, default=None, help="FetchOptions.owner_timeout (s; default 20)")
    f.add_argument("--sched-tick", type=float, default=0.05, help="a Have wakes a node's scheduler at most this often (s)")
    f.add_argument("--no-wire", action="store_true", help="skip the control codec round trip (speed)")
    f.add_argument("--gossip", type=float, default=-1.0,
                   help="first-copy members include every fetcher, learned by gossip this many seconds after it "
                        "arrives (FirstCopy relayed members); negative: sessions only")
    f.add_argument("--max-scale", type=float, default=None,
                   help="what-if: FirstCopy max_scale (1: the fixed timers of before the pace rule)")
    f.add_argument("--pace-factor", type=float, default=None, help="what-if: FirstCopy pace_factor")
    f.add_argument("--endgame-copies", type=int, default=None,
                   help="what-if: FetchOptions.endgame_copies (1: no endgame duplicates; default 2)")
    f.add_argument("--finish-on-choke", action="store_true",
                   help="what-if: a Choke lets the piece on its way finish (the node drops it)")
    f.add_argument("--horizon", type=float, default=None,
                   help="simulated seconds before the run is stopped (default 20 x the fluid bound + 60)")
    f.set_defaults(fn=cmd_fleet)
    o = sub.add_parser("owners", help="first-copy owners agreed when each node sees only its own sessions")
    o.add_argument("--n", type=int, nargs="+", default=[50, 200, 1000, 10000])
    o.add_argument("--degree", type=int, default=32)
    o.add_argument("--pieces", type=int, default=128)
    o.add_argument("--seed", type=int, default=1)
    o.add_argument("--gossip", action="store_true", help="rank the other fetchers too, as relayed members")
    o.set_defaults(fn=cmd_owners)
    args = ap.parse_args(argv)
    if getattr(args, "degree", None) == 0:
        args.degree = None
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
