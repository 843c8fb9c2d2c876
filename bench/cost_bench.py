"""Cost per node (issue #15 §3): CPU-seconds per GiB received per node and peak RSS,
autoglm against libtorrent in one run, beside the host's floor for the same bytes.

Rows (swarm_bench.py's machinery: the same namespaces, the same 50 MiB/s-capped
nginx mirror, the same model; run as root):
  libtorrent, web seed on one peer      one process holding N sessions
  autoglm join + fetch                  N running daemons + N `fetch` commands
  autoglm join --seed (cold)            N daemons started together (start-up included)
and the host floor, measured here over the same size in 8 MiB pieces:
  recv_into one buffer over loopback TCP (the receiving side only), BLAKE3,
  pwrite + fdatasync + DONTNEED (the store's durable write), sendfile cold with
  drop-behind (one upload of every byte); their sum is what a node that receives,
  checks, stores and re-serves each byte once cannot go below.

CPU is user + system of every process of the row (libtorrent's one process
divided by N; autoglm: the daemons' CPU during the fetch plus the fetch commands;
the cold row: the whole daemons' lives). Per GiB = that ÷ the model's size.
Peak RSS: autoglm, the largest daemon's VmHWM; libtorrent, the process's peak ÷ N
(its sessions share one process).

    sudo .venv/bin/python bench/cost_bench.py [--n 8] [--size 1GiB] [--tools lt1,autoglm,autoglm-seed] [--json F]

CPU-seconds are robust to a busy machine (times are not): the table says the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import host_costs
import swarm_bench
from _harness import (
    DEFAULT_WORKDIR,
    MiB,
    check_tools,
    fmt_bytes,
    guarded,
    log,
    make_model,
    on_cleanup,
    print_table,
)

GiB = 1 << 30
PIECE = 8 << 20


def _recv_floor(total: int) -> float:
    """CPU of the receiving side of a loopback TCP transfer read with recv_into into one 8 MiB buffer."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    payload = os.urandom(PIECE)

    def send() -> None:
        with socket.create_connection(("127.0.0.1", port)) as c:
            for _ in range(total // PIECE):
                c.sendall(payload)

    # the sender in another process: process_time here must count only the receiver
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            send()
        finally:
            os._exit(0)
    conn, _ = srv.accept()
    buf = bytearray(PIECE)
    view = memoryview(buf)
    t = time.process_time()
    got = 0
    while got < total:
        pos = 0
        while pos < PIECE:
            n = conn.recv_into(view[pos:], PIECE - pos)
            if n == 0:
                raise RuntimeError("sender closed early")
            pos += n
        got += pos
    cpu = time.process_time() - t
    conn.close()
    srv.close()
    os.waitpid(pid, 0)
    return cpu


def _blake3_floor(total: int) -> float:
    from blake3 import blake3

    buf = os.urandom(PIECE)
    t = time.process_time()
    for _ in range(total // PIECE):
        blake3(buf).digest()
    return time.process_time() - t


def host_floor(total: int, where: Path) -> dict[str, float]:
    """CPU-seconds per GiB of each step a receiving and re-serving node cannot skip."""
    total -= total % PIECE  # whole 8 MiB pieces
    gib = total / GiB
    out = {"recv_into, loopback TCP": _recv_floor(total) / gib, "BLAKE3 (one thread)": _blake3_floor(total) / gib}
    with tempfile.TemporaryDirectory(dir=where) as d:
        path = Path(d) / "floor.bin"
        out["pwrite + fdatasync + DONTNEED"] = host_costs._write(path, total, drop=True) / gib
        out["sendfile cold, drop-behind"] = host_costs._sendfile_cold(path, total)[0] / gib
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--cap-mib", type=float, default=50.0, help="mirror egress cap, MiB/s (default 50, as swarm_bench)")
    ap.add_argument("--tools", default="lt1,autoglm,autoglm-seed")
    ap.add_argument("--no-floor", action="store_true", help="skip the host floor rows")
    ap.add_argument("--json", type=Path, metavar="FILE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("cost_bench needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    missing = [k for k, v in check_tools(["nginx", "ip", "tc", swarm_bench.LT_PYTHON]).items() if not v]
    if missing:
        print(f"missing: {', '.join(missing)} (AUTOGLM_BENCH_DEPS=1 scripts/setup installs them)", file=sys.stderr)
        return 2
    wanted = args.tools.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)
    run_dir = args.workdir / f"cost-run-{os.getpid()}"
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv,
                              "load_before": os.getloadavg(), "rows": {}}
    rows: list[list[str]] = []
    with guarded():
        on_cleanup(lambda: shutil.rmtree(run_dir, ignore_errors=True))
        run_dir.mkdir(parents=True)
        model = make_model(run_dir / "models", args.size)
        gib = model.total_size / GiB
        tag = f"{os.getpid() % 1_000_000}"
        net = swarm_bench.CappedNet(int(args.cap_mib * MiB), f"agm{tag}", f"agc{tag}").up()
        mirror = swarm_bench.start_mirror(model.dir, run_dir / "nginx", net.mirror_ns, net.mirror_ip)
        bench = swarm_bench.Bench(argparse.Namespace(), model, net, mirror, run_dir)
        if "lt1" in wanted:
            err = bench.make_torrent()
            if err:
                bench.unavailable["libtorrent"] = f"creating the torrent failed: {err}"
        plan = {"lt1": ("libtorrent, web seed on one peer", lambda n: bench.run_libtorrent(n, "one")),
                "autoglm": ("autoglm join + fetch", bench.run_autoglm),
                "autoglm-seed": ("autoglm join --seed, cold", bench.run_autoglm_seed)}
        n = args.n
        for key in wanted:
            label, fn = plan[key]
            log(f"N={n}: {label}")
            os.sync()
            row = fn(n)
            report["rows"][key] = row
            if row.get("time") is None:
                rows.append([label, f"not available: {row.get('error')}", "", "", "", ""])
                continue
            per_gib = row["cpu_per_node"] / gib
            rss = row.get("daemon_peak_rss") or (row["peak_rss"] / n if key == "lt1" else row["peak_rss"])
            row["cpu_per_gib_per_node"], row["peak_rss_per_node"] = per_gib, rss
            log(f"    {row['time']:.1f} s, egress {row['egress']:.2f}×, {per_gib:.2f} CPU-s/GiB/node, peak RSS {fmt_bytes(rss)}")
            if args.json:  # after every row: a later failure loses nothing
                args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
            rows.append([label, f"{row['time']:.1f} s", f"{row['egress']:.2f}×", f"{row['cpu_per_node']:.2f}",
                         f"**{per_gib:.2f}**", fmt_bytes(rss)])
        if not args.no_floor:
            floor = host_floor(model.total_size, run_dir)
            report["floor"] = floor
            for name, v in floor.items():
                rows.append([f"host floor: {name}", "", "", "", f"{v:.2f}", ""])
            rows.append(["host floor: sum (receive, hash, store, serve once)", "", "", "", f"{sum(floor.values()):.2f}", ""])
    report["load_after"] = os.getloadavg()
    print_table(f"Cost per node: N={n}, {fmt_bytes(model.total_size)} model, mirror capped at {args.cap_mib:g} MiB/s "
                f"(load average {report['load_before'][0]:.1f} before, {report['load_after'][0]:.1f} after)",
                ["row", "all verified", "origin egress", "CPU-s/node", "CPU-s per GiB per node", "peak RSS/node"], rows,
                note="CPU = user + system. libtorrent: one process with N sessions, CPU and RSS ÷ N. autoglm join + "
                     "fetch: daemons during the fetch + fetch commands; peak RSS = largest daemon's VmHWM.")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
