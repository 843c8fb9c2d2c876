"""Swarm benchmark (issue #4): N nodes fetching one model from a mirror capped at 50 MiB/s.

Network (created here, removed at the end, also on Ctrl-C/SIGTERM):

    netns agm<id>  nginx on 10.200.0.1:8080, veth agm<id> with htb egress cap (aggregate)
         |  veth pair, private /30 that exists only inside these two namespaces
    netns agc<id>  10.200.0.2 on veth agc<id>; lo up; every client runs here and the
                   peers talk to each other on 10.200.0.2 / 127.0.0.1 of this namespace

Rows, side by side in one run, for each N (default 4 8 16):
  libtorrent, web seed on every peer           (bench/_lt_node.py under /usr/bin/python3)
  libtorrent, web seed on one peer only
  N x aria2c -x16 -s16, independent
  autoglm: N `autoglm-node join` + N `autoglm-node fetch` through them
  autoglm-seed: 1 empty bootstrap `join` + N `join --seed MANIFEST` nodes started together
  (autoglm rows say "not available: <error>" when the CLI fails)

Measured: time until every node has the verified model (from the common start),
origin egress = bytes nginx served / bytes one node needs, CPU per node (user+sys).
The floor is one copy through the cap: size / cap.

    sudo .venv/bin/python bench/swarm_bench.py [--n 4 8 16] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    CLIENT_IP,
    DEFAULT_WORKDIR,
    MIRROR_IP,
    PROCS,
    CappedNet,
    MiB,
    Model,
    Nginx,
    Result,
    autoglm_cmd,
    check_tools,
    fmt_bytes,
    fmt_num,
    guarded,
    log,
    make_model,
    measure,
    measure_many,
    netns_prefix,
    on_cleanup,
    parse_json_lines,
    peak_rss_of,
    print_table,
    start_mirror,
    tree_rss,
)

HERE = Path(__file__).resolve().parent
LT_PYTHON = "/usr/bin/python3"  # Debian's python3-libtorrent is only importable there
MULTIADDR_RE = re.compile(r"/ip[46]/[^\s\"',]+/p2p/[A-Za-z0-9]+")


def _verbose_flag() -> list[str]:
    """AUTOGLM_BENCH_VERBOSE=1 runs the nodes with -v (INFO), =2 with -vv (DEBUG)."""
    level = os.environ.get("AUTOGLM_BENCH_VERBOSE", "0")
    return ["-" + "v" * int(level)] if level.isdigit() and int(level) > 0 else []


class EgressTrace:
    """Sample the mirror's veth tx_bytes every 50 ms (AUTOGLM_BENCH_LOGS only): when the cap filled, when it idled.

    One small process in the mirror namespace prints ``monotonic-seconds bytes``
    lines; CLOCK_MONOTONIC is the same clock in every namespace, so the lines
    line up with the row's start (``time.perf_counter`` is that clock too).
    """

    _LOOP = ("import time,sys\n"
             "f=open('/sys/class/net/'+sys.argv[1]+'/statistics/tx_bytes')\n"
             "end=time.monotonic()+float(sys.argv[2])\n"
             "while time.monotonic()<end:\n"
             " f.seek(0); print(f'{time.monotonic():.3f} {f.read().strip()}', flush=True); time.sleep(0.05)\n")

    def __init__(self, net: CappedNet, limit: float) -> None:
        self.lines: list[str] = []
        self.proc = PROCS.start(netns_prefix(net.mirror_ns) + ["python3", "-c", self._LOOP, net.mirror_ns, str(limit)],
                                stdout=subprocess.PIPE, text=True)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout or ()), daemon=True).start()

    def save(self, path: Path, t0: float) -> None:
        PROCS.stop(self.proc, grace=2)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        for ln in list(self.lines):
            t, _, b = ln.partition(" ")
            with contextlib.suppress(ValueError):
                rows.append(f"{float(t) - t0:.3f}\t{int(b)}")
        # the wall clock of the start too, to line the trace up with the nodes' log timestamps
        wall0 = time.time() - (time.perf_counter() - t0)
        path.write_text(f"# start {time.strftime('%H:%M:%S', time.localtime(wall0))}{wall0 % 1:.3f}".replace("0.", ",")
                        + "\nseconds_from_start\ttx_bytes\n" + "\n".join(rows) + "\n")


class Bench:
    def __init__(self, args: argparse.Namespace, model: Model, net: CappedNet, mirror: Nginx, run_dir: Path) -> None:
        self.args = args
        self.model = model
        self.net = net
        self.mirror = mirror
        self.run_dir = run_dir
        self.torrent = run_dir / "model.torrent"
        self.rel = model.big_file.relative_to(model.dir).as_posix()
        self.floor = model.big_size / net.cap
        self.unavailable: dict[str, str] = {}

    def out(self, name: str) -> Path:
        d = self.run_dir / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def timeout(self, n: int, per_copy: bool = False) -> float:
        return (self.floor * (n if per_copy else 1)) * 3 + 60

    def make_torrent(self) -> str | None:
        r = measure([LT_PYTHON, str(HERE / "_lt_node.py"), "make", "--file", str(self.model.big_file),
                     "--out", str(self.torrent)], timeout=600)
        return None if r.ok else r.error()

    # each run_* returns a row dict: time, egress, cpu_per_node, peak_rss, notes / error
    def run_libtorrent(self, n: int, web_seed_peers: str) -> dict[str, Any]:
        key = "libtorrent"
        if key in self.unavailable:
            return {"error": f"skipped, failed before: {self.unavailable[key]}"}
        out = self.out(f"lt-{web_seed_peers}-{n}")
        trace = EgressTrace(self.net, self.timeout(n)) if os.environ.get("AUTOGLM_BENCH_LOGS") else None
        mark = self.mirror.mark()
        t_start = time.perf_counter()
        r = measure([LT_PYTHON, str(HERE / "_lt_node.py"), "run", "--torrent", str(self.torrent), "--n", str(n),
                     # a directory URL: libtorrent treats v2 torrents as multi-file and appends the name
                     "--web-seed", f"http://{MIRROR_IP}:{self.mirror.port}/{Path(self.rel).parent.as_posix()}/".replace("/./", "/"),
                     "--web-seed-peers", web_seed_peers, "--out-dir", str(out), "--listen-ip", CLIENT_IP,
                     "--timeout", str(self.timeout(n))], timeout=self.timeout(n) + 60, netns=self.net.client_ns)
        served = self.mirror.settle(mark)
        if trace is not None:
            trace.save(Path(os.environ["AUTOGLM_BENCH_LOGS"]) / f"egress-{n}-lt-{web_seed_peers}.tsv", t_start)
        shutil.rmtree(out, ignore_errors=True)
        res = next(iter(parse_json_lines(r.stdout)), None)
        if res is None:
            return {"error": r.error()}
        row = {"time": res["all_done_s"], "egress": served / self.model.big_size, "served": served,
               "cpu_per_node": (res["cpu_user"] + res["cpu_sys"]) / n, "peak_rss": res["peak_rss"],
               "per_node": res["times"], "detail": res}
        if res["timed_out"]:
            row["error"] = f"timed out: {sum(t is not None for t in res['times'])}/{n} finished"
        return row

    def run_aria2c(self, n: int) -> dict[str, Any]:
        out = self.out(f"aria2c-{n}")
        url = f"http://{MIRROR_IP}:{self.mirror.port}/{self.rel}"
        argvs = [["aria2c", "-x16", "-s16", "-d", str(out / f"node{i}"), "-o", self.model.big_file.name,
                  "--allow-overwrite=true", "--auto-file-renaming=false", "--summary-interval=0",
                  "--console-log-level=warn", "--download-result=hide", url] for i in range(n)]
        mark = self.mirror.mark()
        rs = measure_many(argvs, timeout=self.timeout(n, per_copy=True), netns=self.net.client_ns)
        served = self.mirror.settle(mark)
        shutil.rmtree(out, ignore_errors=True)
        return self._many_row(rs, n, served, self.model.big_size, note="no hash check")

    def _many_row(self, rs: list[Result], n: int, served: int, need: int, note: str = "",
                  extra_cpu: float = 0.0) -> dict[str, Any]:
        bad = [r for r in rs if not r.ok]
        row: dict[str, Any] = {
            "time": max(r.wall for r in rs) if not bad else None,
            "egress": served / need, "served": served,
            "cpu_per_node": (sum(r.cpu for r in rs) + extra_cpu) / n,
            "peak_rss": max(r.peak_rss for r in rs), "per_node": [round(r.wall, 2) for r in rs], "note": note,
        }
        if bad:
            row["error"] = f"{len(bad)}/{n} failed: {bad[0].error()}"
        return row

    def run_autoglm(self, n: int) -> dict[str, Any]:
        key = "autoglm"
        if self.model.error:
            self.unavailable.setdefault(key, self.model.error)
        if key in self.unavailable:
            return {"error": f"skipped, failed before: {self.unavailable[key]}"}
        assert self.model.manifest is not None and self.model.pub is not None
        out = self.out(f"autoglm-{n}")
        mirror_url = f"http://{MIRROR_IP}:{self.mirror.port}/"
        cli = autoglm_cmd()
        nodes: list[tuple[subprocess.Popen[str], list[str]]] = []
        fetch_out: list[str] = []
        try:
            bootstrap: str | None = None
            verbose = _verbose_flag()
            for i in range(n):
                argv = cli + verbose + ["--data-dir", str(out / f"node{i}" / "data"), "join", "--mirror", mirror_url]
                if bootstrap:
                    argv += ["--bootstrap", bootstrap]
                proc, lines, addr = start_and_wait_multiaddr(argv, self.net.client_ns, timeout=60)
                nodes.append((proc, lines))
                if addr is None:
                    err = "".join(lines[-5:]).strip().splitlines()
                    why = (f"join exited {proc.returncode}" if proc.poll() is not None
                           else "join printed no multiaddr in 60 s")
                    last = err[-1].split(" (choose from")[0][:160] if err else ""
                    self.unavailable[key] = f"{why}: {last}".rstrip(": ")
                    return {"error": self.unavailable[key]}
                bootstrap = bootstrap or addr
            # A running fleet: each daemon has its idle sessions with the others
            # before the fetches start (bounded; the wait is reported, not timed).
            mesh_s = wait_for_mesh(cli, [out / f"node{i}" / "data" for i in range(n)], self.net.client_ns, n - 1, 20.0)
            cpu0 = [proc_cpu(p.pid) for p, _ in nodes]
            argvs = [cli + ["--data-dir", str(out / f"node{i}" / "data"), "fetch", str(self.model.manifest),
                            "--mirror", mirror_url, "--out", str(out / f"node{i}" / "files"),
                            "--trust", str(self.model.pub), "--json"] for i in range(n)]
            trace = EgressTrace(self.net, self.timeout(n, per_copy=True)) if os.environ.get("AUTOGLM_BENCH_LOGS") else None
            mark = self.mirror.mark()
            t_start = time.perf_counter()
            rs = measure_many(argvs, timeout=self.timeout(n, per_copy=True), netns=self.net.client_ns)
            fetch_out = [r.stdout for r in rs]
            if trace is not None:
                Path(os.environ["AUTOGLM_BENCH_LOGS"]).mkdir(parents=True, exist_ok=True)
                trace.save(Path(os.environ["AUTOGLM_BENCH_LOGS"]) / f"egress-{n}-autoglm.tsv", t_start)
            join_cpu = sum(proc_cpu(p.pid) - c0 for (p, _), c0 in zip(nodes, cpu0, strict=True))
            served = self.mirror.settle(mark)
            row = self._many_row(rs, n, served, self.model.total_size, extra_cpu=join_cpu,
                                 note="CPU includes the join daemons")
            by_source: dict[str, int] = {}
            for r in rs:
                done = next((e for e in reversed(parse_json_lines(r.stdout)) if e.get("event") == "done"), None)
                for k, v in ((done or {}).get("bytes_by_source") or {}).items():
                    with contextlib.suppress(TypeError, ValueError):
                        by_source[k] = by_source.get(k, 0) + int(v)
            row["bytes_by_source"] = by_source
            row["mesh_wait_s"] = mesh_s
            # the daemons' own high-water marks (peak_rss above is the fetch commands'); cost_bench reports it
            row["daemon_peak_rss"] = max(peak_rss_of(p.pid) for p, _ in nodes)
            if row.get("error"):
                self.unavailable[key] = row["error"]
            return row
        finally:
            for proc, _ in nodes:
                PROCS.stop(proc, grace=10)
            logs = os.environ.get("AUTOGLM_BENCH_LOGS")
            if logs:  # keep each daemon's output and each fetch's --json lines
                Path(logs).mkdir(parents=True, exist_ok=True)
                for i, (_, lines) in enumerate(nodes):
                    (Path(logs) / f"join-{n}-node{i}.log").write_text("".join(lines))
                for i, text in enumerate(fetch_out):
                    (Path(logs) / f"fetch-{n}-node{i}.log").write_text(text or "")
            shutil.rmtree(out, ignore_errors=True)

    def run_autoglm_seed(self, n: int) -> dict[str, Any]:
        """A bootstrap node holding nothing, then N `join --seed M.agm` nodes started together."""
        key = "autoglm-seed"
        if self.model.error:
            self.unavailable.setdefault(key, self.model.error)
        if key in self.unavailable:
            return {"error": f"skipped, failed before: {self.unavailable[key]}"}
        assert self.model.manifest is not None and self.model.pub is not None
        out = self.out(f"autoglm-seed-{n}")
        mirror_url = f"http://{MIRROR_IP}:{self.mirror.port}/"
        cli = autoglm_cmd()
        nodes: list[JsonNode] = []
        try:
            boot = JsonNode(cli + ["--data-dir", str(out / "boot"), "join", "--json"], self.net.client_ns)
            nodes.append(boot)
            deadline = time.monotonic() + 60
            while boot.addr() is None and boot.proc.poll() is None and time.monotonic() < deadline:
                boot.changed.wait(0.5)
                boot.changed.clear()
            addr = boot.addr()
            if addr is None:
                self.unavailable[key] = f"bootstrap join printed no multiaddr: {boot.last_line()}"
                return {"error": self.unavailable[key]}
            mark = self.mirror.mark()
            t0 = time.perf_counter()
            verbose = _verbose_flag()
            seeds = [JsonNode(cli + verbose + ["--data-dir", str(out / f"node{i}" / "data"), "join", "--json",
                                     "--bootstrap", addr, "--mirror", mirror_url, "--seed", str(self.model.manifest),
                                     "--trust", str(self.model.pub), "--out", str(out / f"node{i}" / "files")],
                                self.net.client_ns) for i in range(n)]
            nodes += seeds
            limit = t0 + self.timeout(n, per_copy=True)
            next_rss = 0.0
            while time.perf_counter() < limit:
                if all("complete" in x.events or "seed-failed" in x.events or x.proc.poll() is not None
                       for x in seeds):
                    break
                if time.perf_counter() >= next_rss:
                    for x in seeds:
                        x.peak_rss = max(x.peak_rss, tree_rss(x.proc.pid))
                    next_rss = time.perf_counter() + 0.5
                time.sleep(0.05)
            cpu = sum(proc_cpu(x.proc.pid) for x in seeds)
            hwm = max(peak_rss_of(x.proc.pid) for x in seeds)
            served = self.mirror.settle(mark)
            done = [x.events["complete"][0] - t0 if "complete" in x.events else None for x in seeds]
            row: dict[str, Any] = {
                "time": max(t for t in done if t is not None) if None not in done else None,
                "egress": served / self.model.total_size,
                "served": served, "cpu_per_node": cpu / n, "peak_rss": max(x.peak_rss for x in seeds),
                "per_node": [round(t, 2) if t is not None else None for t in done],
                # Start-up: median seconds from the common start to "ready" (libp2p up)
                # and to "fetch-started" (peers discovered, first request about to go out).
                "ready_median": _median_event(seeds, "ready", t0),
                "fetch_started_median": _median_event(seeds, "fetch-started", t0),
                "note": "N join --seed + 1 empty bootstrap node; CPU = whole daemon",
                "daemon_peak_rss": hwm,
            }
            by_source: dict[str, int] = {}
            for x in seeds:
                for k, v in ((x.events.get("complete", (0, {}))[1]).get("bytes_by_source") or {}).items():
                    with contextlib.suppress(TypeError, ValueError):
                        by_source[k.split(":", 1)[0]] = by_source.get(k.split(":", 1)[0], 0) + int(v)
            row["bytes_by_source"] = by_source
            if None in done:
                bad = next(x for x in seeds if "complete" not in x.events)
                why = bad.events["seed-failed"][1].get("message") if "seed-failed" in bad.events else bad.last_line()
                row["error"] = f"{done.count(None)}/{n} did not complete: {why}"
            return row
        finally:
            for x in nodes:
                PROCS.stop(x.proc, grace=10)
            logs = os.environ.get("AUTOGLM_BENCH_LOGS")
            if logs:  # keep each node's output (run the nodes with AUTOGLM_BENCH_VERBOSE=1 for -v)
                Path(logs).mkdir(parents=True, exist_ok=True)
                for i, x in enumerate(nodes):
                    (Path(logs) / f"seed-{n}-{'boot' if i == 0 else f'node{i - 1}'}.log").write_text("".join(x.lines))
            shutil.rmtree(out, ignore_errors=True)


class JsonNode:
    """A long-lived `autoglm-node join --json` process; records when each event first appears."""

    def __init__(self, argv: list[str], netns: str) -> None:
        self.proc = PROCS.start(netns_prefix(netns) + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace")
        self.t0 = time.perf_counter()
        self.events: dict[str, tuple[float, dict[str, Any]]] = {}
        self.lines: list[str] = []
        self.changed = threading.Event()
        self.peak_rss = 0
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)
            if len(self.lines) > 2000:
                del self.lines[:500]
            for ev in parse_json_lines(line):
                name = str(ev.get("event"))
                self.events.setdefault(name, (time.perf_counter(), ev))
            self.changed.set()
        self.changed.set()

    def addr(self) -> str | None:
        ev = self.events.get("ready")
        if ev:
            addrs = ev[1].get("addrs") or []
            return str(addrs[0]) if addrs else None
        m = MULTIADDR_RE.search("".join(self.lines))
        return m.group(0) if m else None

    def last_line(self) -> str:
        text = [ln.strip() for ln in self.lines if ln.strip()]
        return text[-1].split(" (choose from")[0][:160] if text else ""

def _median_event(nodes: list[JsonNode], name: str, t0: float) -> float | None:
    ts = sorted(x.events[name][0] - t0 for x in nodes if name in x.events)
    return round(ts[len(ts) // 2], 2) if ts else None


def proc_cpu(pid: int) -> float:
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system + t.children_user + t.children_system)
    except Exception:
        return 0.0


def wait_for_mesh(cli: list[str], data_dirs: list[Path], netns: str, peers: int, limit: float) -> float | None:
    """Poll each `join` daemon's status until it has a session with ``peers`` others; seconds waited, None if not."""
    t0 = time.monotonic()
    pending = list(data_dirs)
    while pending and time.monotonic() - t0 < limit:
        for d in list(pending):
            r = subprocess.run(netns_prefix(netns) + cli + ["--data-dir", str(d), "status", "--json"],
                               capture_output=True, text=True, timeout=30, check=False)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if len(json.loads(r.stdout)["peers"]) >= peers:
                    pending.remove(d)
        if pending:
            time.sleep(0.2)
    return None if pending else round(time.monotonic() - t0, 2)


def start_and_wait_multiaddr(argv: list[str], netns: str, timeout: float) -> tuple[subprocess.Popen[str], list[str], str | None]:
    """Start a long-lived node; return once it printed a multiaddr (or exited / timed out)."""
    proc = PROCS.start(netns_prefix(netns) + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       errors="replace")
    lines: list[str] = []
    found: list[str] = []
    ev = threading.Event()
    keep = 5_000_000 if os.environ.get("AUTOGLM_BENCH_LOGS") else 2000  # kept logs are whole

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if len(lines) > keep:
                del lines[: keep // 4]
            m = MULTIADDR_RE.search(line)
            if m and not found:
                found.append(m.group(0))
                ev.set()
        ev.set()

    threading.Thread(target=pump, daemon=True).start()
    ev.wait(timeout)
    if not found:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)  # stdout closed: let it exit so the error says so
    return proc, lines, (found[0] if found else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8, 16], help="node counts (default 4 8 16)")
    ap.add_argument("--size", default="1GiB", help="model size (default 1GiB)")
    ap.add_argument("--cap-mib", type=float, default=50.0, help="aggregate mirror egress cap, MiB/s (default 50)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 256MiB model, N=4")
    ap.add_argument("--tools", default="lt,lt1,aria2c,autoglm,autoglm-seed",
                    help="rows to run (default lt,lt1,aria2c,autoglm,autoglm-seed; lt1 = one web-seed peer)")
    ap.add_argument("--json", type=Path, metavar="FILE")
    ap.add_argument("--keep", action="store_true", help="keep the generated model in WORKDIR/swarm-models and reuse it next time")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.n = "256MiB", [4]
    if os.geteuid() != 0:
        print("swarm_bench needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    tools = check_tools(["nginx", "aria2c", "ip", "tc", "ss", LT_PYTHON])
    missing = [k for k, v in tools.items() if not v]
    if missing:
        print(f"missing: {', '.join(missing)} (AUTOGLM_BENCH_DEPS=1 scripts/setup installs them)", file=sys.stderr)
        return 2
    wanted = set(args.tools.split(","))
    args.workdir.mkdir(parents=True, exist_ok=True)
    run_dir = args.workdir / f"swarm-run-{os.getpid()}"
    # a private model dir unless --keep: a concurrent run's cleanup must never delete our model
    models = args.workdir / "swarm-models" if args.keep else run_dir / "models"
    cap = int(args.cap_mib * MiB)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv,
                              "cap_bytes_per_s": cap, "runs": {}}
    with guarded():
        on_cleanup(lambda: shutil.rmtree(run_dir, ignore_errors=True))
        run_dir.mkdir(parents=True)
        model = make_model(models, args.size)
        tag = f"{os.getpid() % 1_000_000}"
        net = CappedNet(cap, f"agm{tag}", f"agc{tag}").up()
        mirror = start_mirror(model.dir, run_dir / "nginx", net.mirror_ns, net.mirror_ip)
        bench = Bench(args, model, net, mirror, run_dir)
        log(f"model {fmt_bytes(model.big_size)}, cap {args.cap_mib:g} MiB/s, floor {bench.floor:.1f} s; "
            f"mirror {mirror.url()} in netns {net.mirror_ns}; clients in {net.client_ns}; "
            f"autoglm: {model.error or 'manifest ok'}")
        if wanted & {"lt", "lt1"}:
            err = bench.make_torrent()
            if err:
                bench.unavailable["libtorrent"] = f"creating the torrent failed: {err}"
        rows: list[list[str]] = []
        plan: list[tuple[str, str, Callable[[int], dict[str, Any]]]] = [("lt", "libtorrent, web seed on every peer", lambda n: bench.run_libtorrent(n, "all")),
                ("lt1", "libtorrent, web seed on one peer", lambda n: bench.run_libtorrent(n, "one")),
                ("aria2c", "N × aria2c -x16 -s16", bench.run_aria2c),
                ("autoglm", "autoglm join + fetch", bench.run_autoglm),
                ("autoglm-seed", "autoglm join --seed", bench.run_autoglm_seed)]
        for n in args.n:
            for key, label, fn in plan:
                if key not in wanted:
                    continue
                log(f"N={n}: {label}")
                os.sync()
                t0 = time.perf_counter()
                row = fn(n)
                row["bench_wall"] = time.perf_counter() - t0
                report["runs"].setdefault(str(n), {})[key] = row
                if row.get("time") is None:
                    log(f"    not available: {row.get('error')}")
                    rows.append([str(n), label, f"not available: {row.get('error')}", "", "", "", "", ""])
                    continue
                log(f"    {row['time']:.1f} s, egress {row['egress']:.2f}×")
                rows.append([str(n), label, f"{row['time']:.1f} s", f"{row['time'] / bench.floor:.2f}×",
                             f"{row['egress']:.2f}×", fmt_num(row["cpu_per_node"], ".1f", " s"),
                             fmt_bytes(row["peak_rss"]), row.get("note", "") + (f" {row['error']}" if row.get("error") else "")])
        print_table(f"Swarm: {fmt_bytes(model.big_size)} model, mirror capped at {args.cap_mib:g} MiB/s aggregate "
                    f"(floor {bench.floor:.1f} s)",
                    ["N", "row", "all verified", "÷ floor", "origin egress", "CPU/node", "peak RSS", "notes"], rows,
                    note="time from the common start until the last node finished (libtorrent: all pieces "
                         "hash-checked; aria2c: download complete, no hash check). egress = bytes nginx sent ÷ "
                         "model size. peak RSS: libtorrent = one process holding all N sessions; others per process.")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
            log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
