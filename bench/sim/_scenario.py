"""Scenarios: the model's pieces, the fleet, arrivals, churn, and the fluid lower bound.

``sample_pieces`` plans the benchmark's sample model with the real planner
(autoglm.protocol._pieces), so the simulated pieces are the real sizes.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass, field

from autoglm.protocol._manifest import DEFAULT_MAX_PIECE_SIZE
from autoglm.protocol._pieces import plan_fixed, plan_safetensors, safetensors_tensor_spans

from ._flows import Host
from ._swarm import Params, Swarm

__all__ = ["Fleet", "Result", "Scenario", "fluid_bound", "run", "sample_pieces"]

MiB = 1 << 20
GiB = 1 << 30
Mbit = 1e6 / 8
Gbit = 1e9 / 8


def sample_pieces(size: int, max_piece: int = DEFAULT_MAX_PIECE_SIZE) -> tuple[list[int], list[int]]:
    """Piece sizes and file starts of ``sample-model --size SIZE`` (node/_sample.py's layout, planned for real).

    Files in manifest order: config.json, model.safetensors, tokenizer.json.
    """
    hidden, layers = 256, 4
    per_layer = max(size // layers, 4 * hidden * hidden)
    rows = max(1, per_layer // (2 * 2 * hidden))
    tensors: list[tuple[str, str, tuple[int, ...]]] = [("embed.weight", "F16", (512, hidden))]
    for i in range(layers):
        tensors += [
            (f"layers.{i}.norm.weight", "F32", (hidden,)),
            (f"layers.{i}.mlp.up.weight", "F16", (rows, hidden)),
            (f"layers.{i}.mlp.down.weight", "F16", (hidden, rows)),
        ]
    dsize = {"F32": 4, "F16": 2}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dt, shape in tensors:
        n = dsize[dt]
        for d in shape:
            n *= d
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    file_size = 8 + len(raw) + off
    st = [ln for _, ln in plan_safetensors(file_size, len(raw), safetensors_tensor_spans(raw, file_size), max_piece)]
    config = [ln for _, ln in plan_fixed(80, max_piece)]
    tokenizer = [ln for _, ln in plan_fixed(58, max_piece)]
    sizes = config + st + tokenizer
    return sizes, [0, len(config), len(config) + len(st)]


def uniform_pieces(size: int, piece: int) -> tuple[list[int], list[int]]:
    """One file of ``size`` bytes in fixed pieces (large-N runs with larger pieces)."""
    return [ln for _, ln in plan_fixed(size, piece)], [0]


@dataclass(frozen=True, slots=True)
class Fleet:
    """A class of nodes: ``count`` of them, up/down in bytes/s (down drawn uniformly in [down, down_hi])."""

    count: int
    up: float
    down: float
    down_hi: float | None = None
    up_hi: float | None = None


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    fleets: tuple[Fleet, ...]
    origin: float  # bytes/s of payload the origin can send
    size: int
    piece: int | None = None  # None: the sample model's real pieces (8 MiB max)
    arrival_spread: float = 0.0  # arrivals uniform in [0, spread] s
    churn: float = 0.0  # fraction of nodes that leave mid-fetch (each replaced by a fresh node)
    degree: int | None = None  # sessions per node (None: everyone with everyone)
    host_cpu: float | None = None  # one host for all nodes: bytes/s of receive its CPU allows in all
    params: Params = field(default_factory=Params)
    seed: int = 1


@dataclass(slots=True)
class Result:
    scenario: str
    n: int
    completed: int
    egress: float  # origin bytes / one copy
    times: list[float]  # per node that stayed, from its arrival
    last: float  # the last completion, from t=0
    bound: float  # fluid lower bound for `last`
    events: int
    wall: float
    messages: dict[str, int]
    withdrawn: int
    received: list[float] = field(default_factory=list)  # bytes into each node that completed
    down_total: float = 0.0  # bytes into all nodes' downlinks
    up_total: float = 0.0  # bytes out of all nodes' uplinks
    origin_total: float = 0.0
    mirror_why: dict[str, int] = field(default_factory=dict)

    def pct(self, q: float) -> float:
        xs = sorted(self.times)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    def row(self) -> dict[str, object]:
        return {
            "scenario": self.scenario, "n": self.n, "completed": self.completed, "egress": round(self.egress, 3),
            "p50": round(self.pct(0.5), 2), "p90": round(self.pct(0.9), 2), "max": round(max(self.times, default=0), 2),
            "last": round(self.last, 2), "bound": round(self.bound, 2), "ratio": round(self.last / self.bound, 3),
            "mean": round(statistics.fmean(self.times), 2) if self.times else None,
            "events": self.events, "wall_s": round(self.wall, 1), "withdrawn_runs": self.withdrawn,
            "mirror_pieces_why": self.mirror_why,
        }


def fluid_bound(size: int, origin: float, downs: list[float], ups: list[float], arrivals: list[float],
                host_cpu: float | None = None) -> float:
    """The earliest time every node can hold ``size`` bytes (docs/simulation.md, "The fluid bound").

    max( S/B,  max_i (a_i + S/d_i),  a_min + N·S/(B + Σ up_i),  [a_min + N·S/C for a host of capacity C] )
    """
    n = len(downs)
    a0 = min(arrivals)
    t = max(a0 + size / origin, max(a + size / d for a, d in zip(arrivals, downs, strict=True)), a0 + n * size / (origin + sum(ups)))
    if host_cpu is not None:
        t = max(t, a0 + n * size / host_cpu)
    return t


def run(sc: Scenario, horizon: float | None = None) -> Result:
    """Simulate ``sc``; every node that stays must finish by ``horizon`` (default: 20 × the fluid bound)."""
    t0 = time.process_time()
    rng = random.Random(sc.seed)
    sizes, starts = sample_pieces(sc.size) if sc.piece is None else uniform_pieces(sc.size, sc.piece)
    size = sum(sizes)
    sw = Swarm(sizes, starts, sc.origin, sc.params, sc.seed)
    host = Host(sc.host_cpu) if sc.host_cpu is not None else None
    specs: list[tuple[float, float]] = []
    for f in sc.fleets:
        for _ in range(f.count):
            up = f.up if f.up_hi is None else rng.uniform(f.up, f.up_hi)
            down = f.down if f.down_hi is None else rng.uniform(f.down, f.down_hi)
            specs.append((up, down))
    rng.shuffle(specs)
    n = len(specs)
    arrivals = [0.0 if sc.arrival_spread == 0 else rng.uniform(0, sc.arrival_spread) for _ in range(n)]
    ids = [f"n{k:05d}" for k in range(n)]
    for nid, (up, down), a in zip(ids, specs, arrivals, strict=True):
        sw.add_node(nid, up, down, a, host)
    _wire(sw, ids, sc.degree, rng)
    starts_at = [a + sc.params.start_delay for a in arrivals]
    bound = fluid_bound(size, sc.origin, [d for _, d in specs], [u for u, _ in specs], starts_at, sc.host_cpu)
    # Churn: ``churn * n`` nodes leave at uniform times within the bound; each is replaced by a
    # fresh node of the same class arriving then (a restarted machine with an empty disk).
    leavers = rng.sample(range(n), int(round(sc.churn * n)))
    replacements: list[tuple[str, float]] = []
    for k, idx in enumerate(leavers):
        t = rng.uniform(starts_at[idx], max(starts_at[idx], bound))
        sw.loop.at(t, sw.nodes[ids[idx]].leave)
        up, down = specs[idx]
        rid = f"r{k:05d}"
        sw.add_node(rid, up, down, t, host)
        replacements.append((rid, t))
        specs.append((up, down))
        starts_at.append(t + sc.params.start_delay)
    if replacements:
        _wire(sw, [r for r, _ in replacements], sc.degree, rng, into=ids)
        gone = set(leavers)
        stay = [(d, u, a) for i, ((u, d), a) in enumerate(zip(specs, starts_at, strict=True)) if i not in gone]
        bound = fluid_bound(size, sc.origin, [d for d, _, _ in stay], [u for _, u, _ in stay], [a for _, _, a in stay], sc.host_cpu)
    limit = horizon if horizon is not None else 20 * bound + 60
    stayers = [nd for nd in sw.nodes.values()]

    def all_done() -> bool:
        return all(nd.complete_at is not None or nd.left_at is not None for nd in stayers) and sw.loop.now > 0

    sw.loop.run(limit, stop=all_done)
    done = [nd for nd in sw.nodes.values() if nd.left_at is None and nd.complete_at is not None]
    times = [nd.complete_at - nd.arrived_at for nd in done if nd.complete_at is not None and nd.arrived_at is not None]
    last = max((nd.complete_at for nd in done if nd.complete_at is not None), default=float("inf"))
    stayed = sum(1 for nd in sw.nodes.values() if nd.left_at is None)
    return Result(
        sc.name, stayed, len(done), sw.origin_bytes() / size, times, last, bound, sw.loop.events,
        time.process_time() - t0, dict(sw.stats.messages), sw.stats.withdrawn_runs,
        [nd.down.bytes for nd in done], sum(nd.down.bytes for nd in sw.nodes.values()),
        sum(nd.up.bytes for nd in sw.nodes.values()), sw.origin.bytes, dict(sw.stats.mirror_why),
    )


def _wire(sw: Swarm, ids: list[str], degree: int | None, rng: random.Random, into: list[str] | None = None) -> None:
    """Sessions: everyone with everyone, or each node with ``degree`` random others (a random graph of that mean degree x2)."""
    pool = ids if into is None else into + ids
    if degree == 0:
        return  # no sessions: every node alone with the origin
    if degree is None or degree >= len(pool) - 1:
        for i, a in enumerate(ids):
            for b in (pool[i + 1:] if into is None else pool):
                if a != b:
                    sw.connect(a, b)
        return
    for a in ids:
        for b in rng.sample(pool, min(len(pool), degree // 2 + 1)):
            if a != b:
                sw.connect(a, b)
