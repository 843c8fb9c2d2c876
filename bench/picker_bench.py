"""The piece picker's cost at 100k pieces: the picker before availability buckets vs now.

The old picker is the one at ``--old`` (a git revision; default: the last
commit before the buckets), loaded from git into this process, so both run
the same scenario side by side. The scenario, per picker:

  * 32 peers, each holding a random half of the pieces, join (add_source);
  * ``--picks`` picks of one piece from peers in turn (a peer's request),
    each followed by the piece being written and committed;
  * as many HAVE messages (source_have), each for a piece the peer lacked;
  * a mirror picks runs of up to 64 MiB for the pieces no peer holds.

Each row is microseconds per operation (wall clock, ``time.perf_counter``;
the old picker gets fewer operations when it is slow, see the ``n`` column).

    .venv/bin/python bench/picker_bench.py [--pieces 100000] [--picks 2000] [--old REV] [--check RUNS]

``--check RUNS`` first runs RUNS random operation sequences (small
pickers, peers and mirrors, swarm membership, claims, failures) on both
pickers and stops at the first difference in what they pick or report.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import print_table  # noqa: E402

OLD_REV = "dc0a38f"  # main before issue 12: sorted every pickable piece on each pick
PIECE = 1 << 20
PEERS = 32


def load_old(rev: str) -> types.ModuleType:
    """The picker at ``rev``, with the protocol package it imports from (a single file or split into modules)."""
    tmp = Path(tempfile.mkdtemp(prefix="picker-bench-"))
    atexit.register(shutil.rmtree, tmp, True)
    tar = subprocess.run(["git", "archive", rev, "protocol"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(tmp, filter="data")
    pkg = f"old_protocol_{rev.replace('-', '_').replace('~', '_').replace('^', '_')}"
    (tmp / "protocol").rename(tmp / pkg)
    sys.path.insert(0, str(tmp))
    return importlib.import_module(f"{pkg}._picker")


def _time(fn: Callable[[int], None], n: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    for k in range(n):
        fn(k)
    return (time.perf_counter() - t0) / n * 1e6, n


def run(make: Callable[[], Any], peer_kind: Any, mirror_kind: Any, n: int, picks: int, seed: int) -> dict[str, tuple[float, int]]:
    rng = random.Random(seed)
    holdings = [set(rng.sample(range(n), n // 2)) for _ in range(PEERS)]
    pp = make()
    out: dict[str, tuple[float, int]] = {}
    t0 = time.perf_counter()
    for p, have in enumerate(holdings):
        pp.add_source(f"p{p}", peer_kind, have)
    out["add 32 peers (each)"] = ((time.perf_counter() - t0) / PEERS * 1e6, PEERS)

    def pick(k: int) -> None:
        sid = f"p{k % PEERS}"
        for i in pp.pick(sid, 1, float(k)):
            pp.piece_written(sid, i)
            pp.piece_done(i)

    out["peer pick 1 piece + done"] = _time(pick, picks)
    lacks = [[i for i in rng.sample(range(n), 4 * picks) if i not in holdings[p]] for p in range(PEERS)]

    def have(k: int) -> None:
        p = k % PEERS
        pp.source_have(f"p{p}", lacks[p][k // PEERS])

    out["HAVE"] = _time(have, picks)
    pp.add_source("m", mirror_kind)

    def mirror(k: int) -> None:
        for i in pp.pick("m", 64 * PIECE, float(k)):
            pp.piece_written("m", i)
            pp.piece_done(i)

    out["mirror pick (64 MiB run) + done"] = _time(mirror, max(picks // 10, 10))
    return out


_OPS = ["add", "pick", "pick", "pick", "written", "done", "fail", "bad", "have", "bitfield", "remove",
        "swarm", "claims", "progress", "take", "lost", "cancel"]


def _both(a: Any, b: Any, name: str, *args: Any, new_name: str | None = None) -> None:
    """Call ``name`` on both pickers; their answers must agree."""
    ra, rb = getattr(a, name)(*args), getattr(b, new_name or name)(*args)
    assert ra == rb, (name, args, ra, rb)


class _Swarmed:
    """The new picker and the FirstCopy its caller holds, answering the first-copy calls the old picker had.

    The old picker forwarded owner / set_swarm / peer_claims / my_claims /
    peer_progress / mirror_may_take to its FirstCopy; the node's Fetch now
    makes those calls itself, exactly as here.
    """

    def __init__(self, new: types.ModuleType, sizes: list[int], starts: list[int], me: str | None,
                 owner_timeout: float, **kw: Any) -> None:
        from autoglm.protocol._ownership import FirstCopy

        self.fc = None if me is None else FirstCopy(me, sizes, owner_timeout)
        self.pp = new.PiecePicker(sizes, starts, first_copy=self.fc, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pp, name)

    def owner(self, i: int) -> str | None:
        return None if self.fc is None else self.fc.owner(i)

    def set_swarm(self, peers: list[str], now: float, complete: list[str]) -> bool:
        return self.fc is not None and self.fc.set_members([*peers, *complete], now)

    def peer_claims(self, peer: str, indices: list[int]) -> bool:
        return self.fc is not None and self.fc.peer_claims(peer, indices, done=self.pp.done, requested=self.pp.taken)

    def my_claims(self) -> list[int]:
        return [] if self.fc is None else self.fc.my_claims(self.pp.done)

    def peer_progress(self, peer: str, i: int, now: float) -> bool:
        return self.fc is not None and self.fc.progress(peer, i, now, wanted=self.pp.wants(i))


def same_behaviour(old: types.ModuleType, new: types.ModuleType, seed: int) -> None:
    """One random sequence of operations on both pickers: every pick, state, owner, claim and deadline must agree."""
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    sizes = [rng.choice([50, 100, 100, 2 << 20]) for _ in range(n)]
    starts = sorted({0, *rng.sample(range(n), rng.randint(0, min(3, n)))})
    kw: dict[str, Any] = {
        "have": rng.sample(range(n), rng.randint(0, n // 3)),
        "wanted": None if rng.random() < 0.5 else rng.sample(range(n), rng.randint(1, n)),
        "endgame_copies": rng.choice([1, 2, 3]),
        "mirror_overlap_budget": rng.choice([None, 0, 2]),
        "endgame_delay": rng.choice([0.0, 1.0]),
    }
    me = None if rng.random() < 0.5 else "me"
    a = old.PiecePicker(sizes, starts, me=me, owner_timeout=5.0, **kw)
    b = _Swarmed(new, sizes, starts, me, 5.0, **kw)
    kinds: dict[str, str] = {}
    t = 0.0
    for step in range(200):
        t += rng.random()
        op = rng.choice(_OPS)
        if op == "add":
            sid, kind = f"s{step}", rng.choice(["peer", "peer", "mirror"])
            have = None if kind == "mirror" else set(rng.sample(range(n), rng.randint(0, n)))
            a.add_source(sid, old.SourceKind(kind) if hasattr(old, "SourceKind") else kind, have)
            b.add_source(sid, new.SourceKind(kind), have)
            kinds[sid] = kind
            continue
        if not kinds:
            continue
        sid, i = rng.choice(sorted(kinds)), rng.randrange(n)
        if op == "pick":
            _both(a, b, "pick", sid, rng.choice([1, 100, 250, 10**9]), t)
        elif op == "written" and sid in a.requesters(i):
            _both(a, b, "piece_written", sid, i)
        elif op == "done" and a.state(i) == 2:
            _both(a, b, "piece_done", i)
        elif op in ("fail", "bad") and sid in a.requesters(i):
            a.piece_failed(sid, i, integrity=op == "bad")
            b.piece_failed(sid, i, integrity=op == "bad")
        elif op == "have" and kinds[sid] == "peer":
            _both(a, b, "source_have", sid, i)
        elif op == "bitfield" and kinds[sid] == "peer":
            _both(a, b, "source_bitfield", sid, rng.sample(range(n), rng.randint(0, n)))
        elif op == "remove":
            _both(a, b, "remove_source", sid)
            del kinds[sid]
        elif op == "swarm":
            _both(a, b, "set_swarm", rng.sample("abcd", rng.randint(0, 4)), t, rng.sample("ea", rng.randint(0, 2)))
        elif op == "claims":
            _both(a, b, "peer_claims", rng.choice(["a", "b", "c", "zz"]), [rng.randrange(-1, n + 1) for _ in range(5)])
        elif op == "progress":
            _both(a, b, "peer_progress", rng.choice("abc"), i, t)
        elif op == "take":
            _both(a, b, "take" if hasattr(a, "take") else "claim", sid, i, t, new_name="take")
        elif op == "lost":
            _both(a, b, "piece_lost", i)
        elif op == "cancel":
            _both(a, b, "cancel", sid, [i])
        b.check_invariant()
        for name in ("my_claims", "next_deadline"):
            _both(a, b, name)
        assert [(a.state(k), a.owner(k)) for k in range(n)] == [(b.state(k), b.owner(k)) for k in range(n)], (seed, step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pieces", type=int, default=100_000)
    ap.add_argument("--picks", type=int, default=2000)
    ap.add_argument("--old", default=OLD_REV, help="git revision of the picker to compare with")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check", type=int, metavar="RUNS", default=0,
                    help="first check that both pickers behave the same on RUNS random operation sequences")
    args = ap.parse_args()

    from autoglm.protocol import _picker as new

    old = load_old(args.old)
    if args.check:
        for seed in range(args.check):
            same_behaviour(old, new, seed)
        print(f"old and new picker: the same picks, states, owners, claims and deadlines on {args.check} random runs")
    n = args.pieces
    # The old picker costs tens of milliseconds per pick at this size: fewer operations for it.
    old_picks = max(args.picks // 10, 50)
    res_old = run(lambda: old.PiecePicker([PIECE] * n), old.PEER, old.MIRROR, n, old_picks, args.seed)
    res_new = run(lambda: new.PiecePicker([PIECE] * n), new.PEER, new.MIRROR, n, args.picks, args.seed)
    rows = []
    for op in res_new:
        (o, on), (w, wn) = res_old[op], res_new[op]
        rows.append([op, f"{o:,.1f} (n={on})", f"{w:,.1f} (n={wn})", f"{o / w:,.1f}x" if w else "-"])
    print_table(
        f"piece picker, {n:,} pieces, {PEERS} peers with half the pieces each: µs per operation",
        ["operation", f"old ({args.old})", "new (availability buckets)", "old / new"],
        rows,
    )


if __name__ == "__main__":
    main()
