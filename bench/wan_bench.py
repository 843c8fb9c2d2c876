"""WAN benchmark (issue 15): the origin far away, on the test bed of bench/_wan.py.

Three parts (each its own flag; all three by default):

--rows    The swarm rows of bench/swarm_bench.py (libtorrent with a web seed on every peer
          and on one peer, N x aria2c, autoglm cold `join --seed`, autoglm warm `join` +
          `fetch`) with nginx in the origin namespace behind a WAN link (htb cap, RTT and
          loss by NFQUEUE) and the N nodes on one LAN segment. Each link is first checked
          with one plain TCP flow (cubic against Mathis' estimate, and BBR, this host's
          default). Time from the common start until every node has the verified model;
          origin egress = bytes nginx sent / model size.
--switch  Mirror quality: two origins, one `autoglm-node fetch` with both. Origin A's link
          goes to 400 ms / 8 % at t=3 s, A answers 429 from t=8 s, and recovers at t=13 s.
          The bytes each origin sends are sampled every 0.25 s; the timeline says when the
          load moved and when it came back.
--bulk    The bulk channel at 200 ms / 1 %: one plain TCP flow, curl, our HTTP mirror client
          with one connection and with its default width, and one peerwire connection
          (a seeding node in the origin namespace, a peers-only fetch on the LAN).

    sudo .venv/bin/python bench/wan_bench.py [--n 4 8] [--links 100:0.01 200:0.05] [--size 256MiB]
        [--rows] [--switch] [--bulk] [--json out.json]

Every namespace is created here (names start with "wan") and removed at the end, also on
Ctrl-C/SIGTERM; every process started is ended by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import swarm_bench as sb
from _harness import (
    DEFAULT_WORKDIR,
    PROCS,
    MiB,
    Model,
    autoglm_cmd,
    check_tools,
    guarded,
    log,
    make_model,
    measure,
    on_cleanup,
    parse_json_lines,
    print_table,
    start_mirror,
)
from _wan import Link, WanBed, mathis, tcp_transfer, unavailable


class _Net:
    """What swarm_bench.Bench needs of its network, from a WanBed."""

    def __init__(self, bed: WanBed, cap: int) -> None:
        self.cap = cap
        self.mirror_ns = bed.origin_ns[0]
        self.client_ns = bed.lan_ns[0]


def _bed(links: list[Link]) -> WanBed:
    bed = WanBed(f"{os.getpid() % 100000}", links, max_seconds=7200)
    on_cleanup(bed.down)
    return bed.up()


def _load() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.1f} {la[1]:.1f} {la[2]:.1f} on {os.cpu_count()} CPUs"


def tcp_check(bed: WanBed, link: Link, seconds: float = 6.0) -> dict[str, float]:
    res = {cc: tcp_transfer(bed, seconds=seconds, cc=cc) for cc in ("cubic", "bbr")}
    res["mathis"] = mathis(link.rtt, link.loss)
    log(f"    plain TCP over {link.label()}: cubic {res['cubic'] / 1e6:.2f} MB/s (Mathis {res['mathis'] / 1e6:.2f}), "
        f"bbr {res['bbr'] / 1e6:.2f} MB/s")
    return res


# --------------------------------------------------------------------------- rows


PLAN = [("lt", "libtorrent, web seed everywhere", lambda b, n: b.run_libtorrent(n, "all")),
        ("lt1", "libtorrent, one web seed", lambda b, n: b.run_libtorrent(n, "one")),
        ("aria2c", "N × aria2c", lambda b, n: b.run_aria2c(n)),
        ("autoglm-seed", "autoglm cold join --seed", lambda b, n: b.run_autoglm_seed(n)),
        ("autoglm", "autoglm warm join+fetch", lambda b, n: b.run_autoglm(n))]


def run_rows(args: argparse.Namespace, model: Model, run_dir: Path, report: dict[str, Any]) -> None:
    cap = int(args.cap_mib * MiB)
    wanted = set(args.tools.split(","))
    table: list[list[str]] = []
    checks: list[list[str]] = []
    for spec in args.links:
        rtt_ms, loss = spec.split(":")
        link = Link(float(rtt_ms) / 1000, float(loss), cap)
        log(f"link {link.label()}, cap {args.cap_mib:g} MiB/s ({_load()})")
        bed = _bed([link])
        sb.MIRROR_IP, sb.CLIENT_IP = bed.origin_ip(0), bed.lan_ip(0)
        tcp = tcp_check(bed, link)
        checks.append([link.label(), f"{tcp['cubic'] / 1e6:.2f} MB/s", f"{tcp['mathis'] / 1e6:.2f} MB/s",
                       f"{tcp['bbr'] / 1e6:.2f} MB/s"])
        mirror = start_mirror(model.dir, run_dir / f"nginx-{rtt_ms}-{loss}", bed.origin_ns[0], bed.origin_ip(0))
        bench = sb.Bench(args, model, _Net(bed, cap), mirror, run_dir)  # type: ignore[arg-type]
        bench.timeout = lambda n, per_copy=False: 600.0  # type: ignore[method-assign]
        if wanted & {"lt", "lt1"} and not bench.torrent.exists():
            err = bench.make_torrent()
            if err:
                bench.unavailable["libtorrent"] = f"creating the torrent failed: {err}"
        for n in args.n:
            cells = [link.label(), str(n)]
            for key, label, fn in PLAN:
                if key not in wanted:
                    cells.append("—")
                    continue
                log(f"  {link.label()} N={n}: {label} ({_load()})")
                os.sync()
                row = fn(bench, n)
                row["load"] = os.getloadavg()
                report["rows"].setdefault(link.label(), {}).setdefault(str(n), {})[key] = row
                if row.get("time") is None:
                    log(f"    not available: {row.get('error')}")
                    cells.append("n/a")
                    continue
                log(f"    {row['time']:.1f} s, egress {row['egress']:.2f}×")
                cells.append(f"{row['time']:.1f} s, {row['egress']:.2f}×")
            table.append(cells)
        report["tcp"][link.label()] = tcp
        report["nfq"] = report.get("nfq", []) + bed.nfq_stats
        mirror.stop()
        bed.down()
    print_table("Plain TCP, one flow, origin -> LAN", ["origin link", "cubic", "Mathis estimate", "bbr (host default)"],
                checks)
    print_table(f"WAN: {model.big_size / MiB:.0f} MiB, origin capped at {args.cap_mib:g} MiB/s",
                ["origin link", "N", *[label for _, label, _ in PLAN]], table,
                note="time until every node has the verified model, then origin egress (bytes nginx sent ÷ model "
                     "size). One run; " + _load() + " at the end.")


# --------------------------------------------------------------------------- switch

_SAMPLER = ("import time,sys\n"
            "fs=[open(f'/sys/class/net/{d}/statistics/rx_bytes') for d in sys.argv[2:]]\n"
            "end=time.monotonic()+float(sys.argv[1])\n"
            "while time.monotonic()<end:\n"
            " v=[]\n"
            " for f in fs: f.seek(0); v.append(f.read().strip())\n"
            " print(f'{time.monotonic():.3f}', *v, flush=True); time.sleep(0.25)\n")


def run_switch(args: argparse.Namespace, model: Model, run_dir: Path, report: dict[str, Any]) -> None:
    cap = int(args.switch_cap_mib * MiB)
    good = Link(0.02, 0.0, cap)
    bed = _bed([good, good])
    busy = run_dir / "nginx-a" / "busy"
    a = start_mirror(model.dir, run_dir / "nginx-a", bed.origin_ns[0], bed.origin_ip(0),
                     location_extra=f"if (-f {busy}) {{ add_header Retry-After 1 always; return 429; }}")
    b = start_mirror(model.dir, run_dir / "nginx-b", bed.origin_ns[1], bed.origin_ip(1))
    assert model.manifest is not None and model.pub is not None
    out = run_dir / "switch-out"
    shutil.rmtree(out, ignore_errors=True)
    sampler = PROCS.start(bed.exec(bed.router) + [sys.executable, "-c", _SAMPLER, "900", "ro0", "ro1"],
                          stdout=subprocess.PIPE, text=True)
    samples: list[tuple[float, int, int]] = []

    def pump() -> None:
        assert sampler.stdout is not None
        for ln in sampler.stdout:
            t, x, y = ln.split()
            samples.append((float(t), int(x), int(y)))

    threading.Thread(target=pump, daemon=True).start()
    events: list[tuple[float, str]] = []
    t0 = time.monotonic()

    def script() -> None:
        for at, what in ((3.0, "slow"), (8.0, "429"), (13.0, "recovered")):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            if fetch_done.is_set():
                return
            if what == "slow":
                bed.set_link(0, Link(0.4, 0.08, cap))
            elif what == "429":
                busy.touch()
            else:
                busy.unlink(missing_ok=True)
                bed.set_link(0, good)
            events.append((time.monotonic() - t0, what))
            log(f"    t={time.monotonic() - t0:.1f} s: origin A {what}")

    fetch_done = threading.Event()
    th = threading.Thread(target=script, daemon=True)
    th.start()
    r = measure(autoglm_cmd() + ["--data-dir", str(run_dir / "switch-data"), "fetch", str(model.manifest),
                                 "--mirror", a.url(), "--mirror", b.url(), "--trust", str(model.pub),
                                 "--out", str(out), "--json"], timeout=600, netns=bed.lan_ns[0])
    fetch_done.set()
    wall = time.monotonic() - t0
    th.join(timeout=30)
    PROCS.stop(sampler, grace=2)
    shutil.rmtree(out, ignore_errors=True)
    done = next((e for e in reversed(parse_json_lines(r.stdout)) if e.get("event") == "done"), {})
    # rates per 1-s window from the samples (origin A = ro0, origin B = ro1)
    rows: list[list[str]] = []
    timeline: list[dict[str, float]] = []
    s0 = [s for s in samples if s[0] >= t0] or samples
    for k in range(0, int(wall) + 1):
        win = [s for s in s0 if t0 + k <= s[0] <= t0 + k + 1]
        if len(win) < 2:
            continue
        dt = win[-1][0] - win[0][0]
        ra, rb = (win[-1][1] - win[0][1]) / dt, (win[-1][2] - win[0][2]) / dt
        share = ra / (ra + rb) if ra + rb else 0.0
        timeline.append({"t": k, "a": ra, "b": rb, "share_a": share})
        marks = ", ".join(w for t, w in events if k <= t < k + 1)
        rows.append([f"{k}–{k + 1}", f"{ra / 1e6:.1f}", f"{rb / 1e6:.1f}", f"{share * 100:.0f} %", marks])
    ev = dict((w, t) for t, w in events)
    before = [x["share_a"] for x in timeline if x["t"] + 1 <= ev.get("slow", 0)]
    moved = next((x["t"] + 1 - ev["slow"] for x in timeline if "slow" in ev and x["t"] >= ev["slow"]
                  and x["share_a"] < 0.2), None)
    back = next((x["t"] + 1 - ev["recovered"] for x in timeline if "recovered" in ev and x["t"] >= ev["recovered"]
                 and x["share_a"] >= 0.35), None)
    report["switch"] = {"ok": r.ok, "error": None if r.ok else r.error(), "wall": wall, "events": events,
                        "timeline": timeline, "moved_s": moved, "back_s": back,
                        "bytes_by_source": done.get("bytes_by_source"), "load": os.getloadavg()}
    moved_s = f"within {moved:.0f} s" if moved is not None else "never"
    back_s = f"within {back:.0f} s" if back is not None else "not before the end"
    print_table(f"Mirror switch: {model.total_size / MiB:.0f} MiB from two origins capped at {args.switch_cap_mib:g} MiB/s "
                "each (20 ms); A: 400 ms / 8 % at 3 s, 429s at 8 s, healthy at 13 s",
                ["seconds", "A MB/s", "B MB/s", "A's share", "event"], rows,
                note=f"fetch {'ok' if r.ok else r.error()} in {wall:.1f} s; A's share before: "
                     f"{(sum(before) / len(before) * 100 if before else 0):.0f} %; load moved (A < 20 %) "
                     f"{moved_s} of the slow-down; came back "
                     f"(A ≥ 35 %) {back_s} of the "
                     f"recovery. {_load()}")
    a.stop()
    b.stop()
    bed.down()


# --------------------------------------------------------------------------- bulk


def run_bulk(args: argparse.Namespace, model: Model, run_dir: Path, report: dict[str, Any]) -> None:
    link = Link(0.2, 0.01, None)
    bed = _bed([link])
    tcp = tcp_check(bed, link, seconds=15)
    nginx = start_mirror(model.dir, run_dir / "nginx-bulk", bed.origin_ns[0], bed.origin_ip(0))
    assert model.manifest is not None and model.pub is not None
    size = model.total_size
    cli = autoglm_cmd()
    rows = [["one TCP flow, cubic", f"{tcp['cubic'] / 1e6:.2f}", f"Mathis {tcp['mathis'] / 1e6:.2f}"],
            ["one TCP flow, bbr", f"{tcp['bbr'] / 1e6:.2f}", "host default congestion control"]]
    res: dict[str, Any] = {"tcp": tcp}

    def timed(name: str, argv: list[str], nbytes: int, note: str) -> None:
        out = run_dir / "bulk-out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        r = measure(argv + ([] if argv[0].endswith("curl") else ["--out", str(out)]), timeout=600, netns=bed.lan_ns[0],
                    cwd=out)
        rate = nbytes / r.wall if r.ok else None
        res[name] = {"ok": r.ok, "wall": r.wall, "rate": rate, "error": None if r.ok else r.error()}
        log(f"    {name}: {r.wall:.1f} s, {(rate or 0) / 1e6:.2f} MB/s {'' if r.ok else r.error()}")
        rows.append([name, f"{rate / 1e6:.2f}" if rate else "n/a", note + ("" if r.ok else f" ({r.error()})")])
        shutil.rmtree(out, ignore_errors=True)

    url = nginx.url(model.big_file.relative_to(model.dir).as_posix())
    timed("curl, one connection", [shutil.which("curl") or "curl", "-s", "-o", "file.bin", url], model.big_size,
          "the whole file, no checks")
    base = cli + ["--data-dir", str(run_dir / "bulk-data"), "fetch", str(model.manifest), "--trust", str(model.pub),
                  "--json"]
    for conns in (1, 4):
        shutil.rmtree(run_dir / "bulk-data", ignore_errors=True)
        timed(f"autoglm fetch, HTTP mirror, {conns} connection{'s' if conns > 1 else ''}",
              base + ["--mirror", nginx.url(), "--connections", str(conns), "--max-connections", str(conns)], size,
              "verified, written; includes start-up")
    # one peerwire connection: a node in the origin namespace seeds the model (from the local nginx)
    seed_dir = run_dir / "bulk-seed"
    seed = sb.JsonNode(cli + ["--data-dir", str(seed_dir / "data"), "join", "--json", "--listen",
                              f"/ip4/{bed.origin_ip(0)}/tcp/0", "--peerwire", f"{bed.origin_ip(0)}:0",
                              "--seed", str(model.manifest), "--mirror", nginx.url(),
                              "--trust", str(model.pub), "--out", str(seed_dir / "files")], bed.origin_ns[0])
    deadline = time.monotonic() + 300
    while "complete" not in seed.events and seed.proc.poll() is None and time.monotonic() < deadline:
        seed.changed.wait(0.5)
        seed.changed.clear()
    addr = seed.addr()
    if "complete" in seed.events and addr:
        shutil.rmtree(run_dir / "bulk-data", ignore_errors=True)
        timed("autoglm fetch, one peerwire connection", base + ["--bootstrap", addr], size,
              "peers only; verified, written; includes start-up")
    else:
        rows.append(["one peerwire connection", "n/a", f"seed node not ready: {seed.last_line()}"])
    PROCS.stop(seed.proc, grace=10)
    shutil.rmtree(seed_dir, ignore_errors=True)
    report["bulk"] = res | {"load": os.getloadavg()}
    print_table(f"Bulk channel at {link.label()}, no cap: {size / MiB:.0f} MiB", ["transfer", "MB/s", "notes"], rows,
                note=_load())
    nginx.stop()
    bed.down()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--links", nargs="+", default=["100:0.01", "200:0.05"], help="RTT_MS:LOSS per origin link")
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--cap-mib", type=float, default=50.0, help="origin egress cap for --rows, MiB/s")
    ap.add_argument("--switch-cap-mib", type=float, default=8.0, help="each origin's cap for --switch, MiB/s")
    ap.add_argument("--tools", default="lt,lt1,aria2c,autoglm-seed,autoglm")
    ap.add_argument("--rows", action="store_true")
    ap.add_argument("--switch", action="store_true")
    ap.add_argument("--bulk", action="store_true")
    ap.add_argument("--json", type=Path, metavar="FILE")
    args = ap.parse_args(argv)
    if not (args.rows or args.switch or args.bulk):
        args.rows = args.switch = args.bulk = True
    why = unavailable()
    if why:
        print(f"wan_bench: {why}", file=sys.stderr)
        return 2
    missing = [k for k, v in check_tools(["nginx", "aria2c", "curl", sb.LT_PYTHON]).items() if not v]
    if missing:
        print(f"missing: {', '.join(missing)} (AUTOGLM_BENCH_DEPS=1 scripts/setup installs them)", file=sys.stderr)
        return 2
    run_dir = args.workdir / f"wan-run-{os.getpid()}"
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv,
                              "rows": {}, "tcp": {}, "load_start": os.getloadavg()}
    with guarded():
        on_cleanup(lambda: shutil.rmtree(run_dir, ignore_errors=True))
        run_dir.mkdir(parents=True)
        model = make_model(args.workdir / "wan-models", args.size)
        if model.error:
            print(f"wan_bench: the sample model could not be published: {model.error}", file=sys.stderr)
            return 1
        if args.bulk:
            run_bulk(args, model, run_dir, report)
        if args.switch:
            run_switch(args, model, run_dir, report)
        if args.rows:
            run_rows(args, model, run_dir, report)
        report["load_end"] = os.getloadavg()
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
            log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
