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

    .venv/bin/python bench/picker_bench.py [--pieces 100000] [--picks 2000] [--old REV]

(A ``--check`` mode once replayed random operation sequences on an old
and the new picker to prove the restructures changed no behaviour; it was
removed when the endgame rule changed behaviour on purpose, 2026-12-08. Its
results are in docs/benchmarks.md; tests/protocol holds the picker's rules.)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pieces", type=int, default=100_000)
    ap.add_argument("--picks", type=int, default=2000)
    ap.add_argument("--old", default=OLD_REV, help="git revision of the picker to compare with")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    from autoglm.protocol import _picker as new

    old = load_old(args.old)
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
