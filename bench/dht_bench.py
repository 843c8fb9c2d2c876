#!/usr/bin/env python3
"""The DHT at scale: lookup latency and membership convergence with many real nodes.

Each node is a real py-libp2p host with our Kademlia adapter (``open_p2p`` of
node/_p2p.py: Noise, yamux, KadDHT in server mode, our name-record validator)
listening on its own TCP port on 127.0.0.1. Nodes run ``--per-proc`` to a
process (a full ``autoglm-node join`` per node adds the store, the swarm and
the control API, about 90 MiB and 1-2 CPU-s of start-up each, which this
2-core machine shared with other work cannot give 64 times). Every node
bootstraps from node 0 only, as ``join --bootstrap`` does.

Phases, all timed with the wall clock of this machine:
1. convergence: ``--holders`` nodes provide one manifest at t0; every node
   asks the DHT (``find_manifest_providers``) every ``--poll`` seconds until
   it knows every holder; its convergence time is when that first happened.
2. provider lookups: one node provides a fresh manifest; every node looks it
   up ``--lookups`` times (all nodes at once in each round).
3. name records: one node puts a signed name record; every node resolves it
   ``--lookups`` times, all nodes at once in each round (``get_name_record``:
   the local value and the 20 closest peers' values, highest seq wins).

Every lookup is bounded by the adapter's 20 s (``_DHT_TIMEOUT``): a lookup
that takes longer returns nothing and counts as unanswered.

    .venv/bin/python bench/dht_bench.py --nodes 64 --per-proc 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _harness import PROCS, guarded, log, print_table  # noqa: E402


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


# -- worker: K nodes in one process, driven by JSON lines on stdin ---------------
async def _worker(args: argparse.Namespace) -> None:
    import trio
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from autoglm.node._p2p import P2PNode, open_p2p
    from autoglm.protocol._namerecord import sign_name_record
    from autoglm.protocol._signing import key_id

    def say(**kw: Any) -> None:
        print(json.dumps(kw), flush=True)

    root = Path(args.dir)
    nodes: list[P2PNode] = []
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buf = b""

    async def command() -> dict[str, Any]:
        nonlocal buf
        while b"\n" not in buf:
            data = await stdin.receive_some(65536)
            if not data:
                raise SystemExit(0)
            buf += data
        line, buf = buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(line)
        return out

    async def start_node(i: int, boot: list[str], task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with open_p2p(root / f"n{i}", bootstrap=boot) as p2p:
            nodes.append(p2p)
            task_status.started()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        boot = [args.bootstrap] if args.bootstrap else []
        for i in range(args.count):
            await nursery.start(start_node, args.first + i, boot)
            if not boot:
                boot = [nodes[0].addrs()[0]]
        say(ev="ready", peers=[n.peer_id for n in nodes], addrs=[n.addrs()[0] for n in nodes],
            table=[n.dht_size() for n in nodes])
        while True:
            cmd = await command()
            op = cmd["op"]
            if op == "provide":
                mid = bytes.fromhex(cmd["manifest"])
                mine = [n for n in nodes if n.peer_id in set(cmd["who"])]
                oks: list[bool] = []

                async def provide(n: P2PNode, mid: bytes = mid, oks: list[bool] = oks) -> None:
                    oks.append(await n.provide_manifest(mid))

                async with trio.open_nursery() as n2:
                    for n in mine:
                        n2.start_soon(provide, n)
                say(ev="provided", n=len(mine), ok=sum(oks))
            elif op == "converge":
                mid = bytes.fromhex(cmd["manifest"])
                want = set(cmd["holders"])
                t0 = float(cmd["t0"])
                done: dict[str, float] = {}
                asks: dict[str, int] = {}
                knew: dict[str, int] = {}

                async def poll(n: P2PNode, want: set[str] = want, mid: bytes = mid, t0: float = t0,
                               done: dict[str, float] = done, asks: dict[str, int] = asks,
                               knew: dict[str, int] = knew) -> None:
                    await trio.sleep(random.random() * args.poll)
                    known: set[str] = set()
                    while True:
                        asks[n.peer_id] = asks.get(n.peer_id, 0) + 1
                        known |= {p.peer_id for p in await n.find_manifest_providers(mid)}
                        knew[n.peer_id] = len(known & want)
                        if want - {n.peer_id} <= known:
                            done[n.peer_id] = time.time() - t0
                            return
                        await trio.sleep(args.poll)

                with trio.move_on_after(args.timeout):
                    async with trio.open_nursery() as n2:
                        for n in nodes:
                            n2.start_soon(poll, n)
                say(ev="converged", times=list(done.values()), missing=len(nodes) - len(done), asks=sum(asks.values()),
                    knew=list(knew.values()))
            elif op == "lookup":
                mid = bytes.fromhex(cmd["manifest"])
                lat: list[float] = []
                hits: list[bool] = []

                async def find(n: P2PNode, mid: bytes = mid, lat: list[float] = lat, hits: list[bool] = hits) -> None:
                    t = time.perf_counter()
                    got = await n.find_manifest_providers(mid)
                    lat.append(time.perf_counter() - t)
                    hits.append(bool(got))

                for _ in range(args.lookups):
                    async with trio.open_nursery() as n2:
                        for n in nodes:
                            n2.start_soon(find, n)
                say(ev="looked", lat=lat, found=sum(hits))
            elif op == "put_name":
                key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(cmd["key"]))
                rec = sign_name_record(key, "bench-model", bytes.fromhex(cmd["manifest"]), "1", 1)
                t = time.perf_counter()
                try:
                    await nodes[0].put_name_record(rec)
                    ok = True
                except trio.TooSlowError:  # stored locally; the network part took longer than the adapter waits
                    ok = False
                say(ev="put", seconds=time.perf_counter() - t, ok=ok)
            elif op == "resolve":
                key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(cmd["key"]))
                from cryptography.hazmat.primitives import serialization

                pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                kid = key_id(pub)
                lat = []
                hits = []

                async def resolve(n: P2PNode, kid: str = kid, want: str = cmd["manifest"], lat: list[float] = lat,
                                  hits: list[bool] = hits) -> None:
                    t = time.perf_counter()
                    rec2 = await n.get_name_record(kid, "bench-model")
                    lat.append(time.perf_counter() - t)
                    hits.append(rec2 is not None and rec2.manifest_id.hex() == want)

                for _ in range(args.lookups):
                    async with trio.open_nursery() as n2:
                        for n in nodes:
                            n2.start_soon(resolve, n)
                say(ev="resolved", lat=lat, found=sum(hits))
            elif op == "idle":
                # Every node idle: CPU of this process (its hosts) over the window, and the table sizes.
                import resource

                def cpu() -> float:
                    r = resource.getrusage(resource.RUSAGE_SELF)
                    return r.ru_utime + r.ru_stime

                c0, t = cpu(), time.perf_counter()
                await trio.sleep(float(cmd["seconds"]))
                say(ev="idled", cpu=cpu() - c0, seconds=time.perf_counter() - t, hosts=len(nodes),
                    table=[n.dht_size() for n in nodes], conns=[len(n.connected_peers()) for n in nodes])
            elif op == "stop":
                nursery.cancel_scope.cancel()


def worker_main(args: argparse.Namespace) -> None:
    import logging

    import trio

    logging.basicConfig(level=logging.ERROR)
    if args.debug_log:
        # Every DHT query's failure (node/_kadwalk.py, node/_kadclient.py), for diagnosis.
        handler = logging.FileHandler(args.debug_log)
        handler.setFormatter(logging.Formatter("%(created).3f %(name)s %(message)s"))
        for name in ("autoglm.node._kadwalk", "autoglm.node._kadclient"):
            logging.getLogger(name).setLevel(logging.DEBUG)
            logging.getLogger(name).addHandler(handler)
            logging.getLogger(name).propagate = False
    if args.profile:
        import cProfile

        cProfile.runctx("trio.run(_worker, args)", globals(), {"trio": trio, "args": args, "_worker": _worker},
                        filename=args.profile)
    else:
        trio.run(_worker, args)


# -- parent ------------------------------------------------------------------------
class Worker:
    def __init__(self, idx: int, first: int, count: int, bootstrap: str | None, root: Path, args: argparse.Namespace) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--first", str(first), "--count", str(count),
                "--dir", str(root / f"w{idx}"), "--poll", str(args.poll), "--lookups", str(args.lookups),
                "--timeout", str(args.timeout)]
        if bootstrap:
            argv += ["--bootstrap", bootstrap]
        if args.debug_logs:
            argv += ["--debug-log", str(args.debug_logs / f"w{idx}.log")]
            if args.profile_workers:
                argv += ["--profile", str(args.debug_logs / f"w{idx}.prof")]
        self.proc = PROCS.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.peers: list[str] = []
        self.addrs: list[str] = []

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, ev: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.startswith("{"):
                continue
            msg: dict[str, Any] = json.loads(line)
            if msg.get("ev") == ev:
                return msg
        raise RuntimeError(f"worker exited before {ev!r} (rc {self.proc.wait()})")


def _rows(name: str, lat: list[float], found: int, total: int) -> list[str]:
    p50, p90 = _pct(lat, 0.5), _pct(lat, 0.9)
    return [name, str(len(lat)), f"{1000 * p50:.0f} ms" if p50 is not None else "-",
            f"{1000 * p90:.0f} ms" if p90 is not None else "-", f"{1000 * max(lat):.0f} ms" if lat else "-", f"{found}/{total}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--per-proc", type=int, default=16)
    ap.add_argument("--holders", type=int, default=4, help="nodes that provide the manifest in the convergence phase")
    ap.add_argument("--poll", type=float, default=1.0, help="seconds between a node's DHT lookups while converging")
    ap.add_argument("--lookups", type=int, default=1, help="lookups per node in each latency phase")
    ap.add_argument("--timeout", type=float, default=60.0, help="bound on the convergence phase")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of the idle CPU window at the end")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--debug-logs", type=Path, help="a directory: each worker logs every DHT query's failure there")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--debug-log", help=argparse.SUPPRESS)
    ap.add_argument("--profile", help=argparse.SUPPRESS)
    ap.add_argument("--profile-workers", action="store_true", help="with --debug-logs: a cProfile of each worker there too")
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args)
        return 0
    with guarded(), tempfile.TemporaryDirectory(prefix="dht-bench-") as tmp:
        root = Path(tmp)
        t_start = time.time()
        counts = [min(args.per_proc, args.nodes - i) for i in range(0, args.nodes, args.per_proc)]
        first = Worker(0, 0, counts[0], None, root, args)
        first.__dict__.update(peers=(m := first.expect("ready"))["peers"], addrs=m["addrs"])
        boot = first.addrs[0]
        workers = [first]
        start = counts[0]
        for idx, c in enumerate(counts[1:], 1):
            workers.append(Worker(idx, start, c, boot, root, args))
            start += c
        tables: list[int] = list(m["table"])
        for w in workers[1:]:
            m = w.expect("ready")
            w.peers, w.addrs = m["peers"], m["addrs"]
            tables += m["table"]
        t_up = time.time() - t_start
        log(f"{args.nodes} nodes up in {t_up:.1f} s; routing table sizes p50 {_pct([float(t) for t in tables], 0.5)}")
        every = [p for w in workers for p in w.peers]
        rng = random.Random(7)

        # 1. convergence
        holders = rng.sample(every, min(args.holders, len(every)))
        mid = os.urandom(32).hex()
        t0 = time.time()
        for w in workers:
            w.send(op="provide", manifest=mid, who=holders)
        provided_ok = sum(w.expect("provided")["ok"] for w in workers)
        t_provide = time.time() - t0
        log(f"provide: {provided_ok} of {len(holders)} holders placed a record in {t_provide:.1f} s")
        for w in workers:
            w.send(op="converge", manifest=mid, holders=holders, t0=t0)
        conv: list[float] = []
        missing = asks = 0
        knew: list[int] = []
        for w in workers:
            m = w.expect("converged")
            conv += m["times"]
            missing += m["missing"]
            asks += m["asks"]
            knew += m["knew"]
        known_p50 = _pct([float(k) for k in knew], 0.5)
        log(f"converged: {len(conv)} nodes, {missing} missing, {asks} lookups; holders known p50 {known_p50}, min {min(knew, default=0)}")

        # 2. provider lookups of a fresh manifest with one provider
        mid2 = os.urandom(32).hex()
        workers[-1].send(op="provide", manifest=mid2, who=[workers[-1].peers[-1]])
        workers[-1].expect("provided")
        lat: list[float] = []
        found = 0
        for w in workers:
            w.send(op="lookup", manifest=mid2)
        for w in workers:
            m = w.expect("looked")
            lat += m["lat"]
            found += m["found"]
        log(f"provider lookups: p50 {_pct(lat, 0.5)} p90 {_pct(lat, 0.9)} answered {found}")

        # 3. name records
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()).hex()
        workers[0].send(op="put_name", key=key, manifest=mid2)
        put = workers[0].expect("put")
        log(f"name record put: {put['seconds']:.1f} s, {'done' if put['ok'] else 'timed out (stored locally)'}")
        nlat: list[float] = []
        nfound = 0
        for w in workers:
            w.send(op="resolve", key=key, manifest=mid2)
        for w in workers:
            m = w.expect("resolved")
            nlat += m["lat"]
            nfound += m["found"]
        # 4. idle: every host quiet (the routing-table refreshes at 0 and 30 s after start are over)
        for w in workers:
            w.send(op="idle", seconds=args.idle)
        idle_cpu = idle_s = 0.0
        tables_end: list[int] = []
        conns_end: list[int] = []
        for w in workers:
            m = w.expect("idled")
            conns_end += m["conns"]
            idle_cpu += m["cpu"]
            idle_s = max(idle_s, m["seconds"])
            tables_end += m["table"]
        idle_pct = 100 * idle_cpu / idle_s / args.nodes
        log(f"idle: {idle_pct:.2f} % of a core per host; routing tables p50 {_pct([float(t) for t in tables_end], 0.5)}"
            f" (min {min(tables_end, default=0)}); libp2p connections per host p50 {_pct([float(c) for c in conns_end], 0.5)}"
            f" (max {max(conns_end, default=0)})")
        for w in workers:
            w.send(op="stop")
        for w in workers:
            try:
                w.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                PROCS.stop(w.proc)

        total = args.nodes * args.lookups
        print_table(
            f"DHT lookups, {args.nodes} nodes in {len(workers)} processes, every node at once, {args.lookups} round(s)",
            ["lookup", "n", "p50", "p90", "max", "answered"],
            [_rows("providers (fresh manifest, 1 provider)", lat, found, total),
             _rows("name record (put by one node)", nlat, nfound, total)],
        )
        c50, c90 = _pct(conv, 0.5), _pct(conv, 0.9)
        print_table(
            f"Membership convergence: {len(holders)} holders provide at t0, every node polls every {args.poll:g} s",
            ["nodes", "provide (all holders)", "p50", "p90", "last", f"never (in {args.timeout:.0f} s)", "lookups"],
            [[str(args.nodes), f"{t_provide:.1f} s", f"{c50:.1f} s" if c50 is not None else "-",
              f"{c90:.1f} s" if c90 is not None else "-", f"{max(conv):.1f} s" if conv else "-", str(missing), str(asks)]],
            note=f"idle CPU per host {idle_pct:.2f} % of a core over {idle_s:.0f} s; routing table size at the end p50 "
                 f"{_pct([float(t) for t in tables_end], 0.5)} (min {min(tables_end, default=0)}); "
                 f"start-up of all nodes {t_up:.1f} s; holders known at the end (of {len(holders)}): p50 {known_p50}, "
                 f"min {min(knew, default=0)}; name record put {put['seconds']:.1f} s ({'ok' if put['ok'] else 'timed out'})",
        )
        if args.json:
            args.json.write_text(json.dumps({"nodes": args.nodes, "provider_lat": lat, "name_lat": nlat, "converge": conv,
                                             "missing": missing, "startup_s": t_up, "provide_s": t_provide,
                                             "holders_known": knew, "idle_cpu_pct_per_host": idle_pct,
                                             "tables_start": tables, "tables_end": tables_end, "conns_end": conns_end, "put_s": put["seconds"], "put_ok": put["ok"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
