"""Cost per node (issue #15 §3): CPU-seconds per GiB received per node and peak RSS,
autoglm against libtorrent in one run, beside the host's floor for the same bytes.

Rows (swarm_bench.py's machinery: the same namespaces, the same 50 MiB/s-capped
nginx mirror, the same model; run as root):
  libtorrent, web seed on one peer      one process holding N sessions
  autoglm join + fetch                  N running daemons + N `fetch` commands
  autoglm join --seed (cold)            N daemons started together (start-up included)
and the host floor, measured here over the same size in 8 MiB pieces:
  recv_into one buffer over loopback TCP (the receiving side only), BLAKE3,
  pwrite + fdatasync + DONTNEED (the store's durable write), sendfile cold into loopback TCP with
  drop-behind (one upload of every byte); their sum is what a node that receives,
  checks, stores and re-serves each byte once cannot go below.

CPU is user + system of every process of the row (libtorrent's one process
divided by N; autoglm: the daemons' CPU during the fetch plus the fetch commands;
the cold row: the whole daemons' lives). Per GiB = that ÷ the model's size.
Peak RSS: autoglm, the largest daemon's VmHWM; libtorrent, the process's peak ÷ N
(its sessions share one process).

    sudo .venv/bin/python bench/cost_bench.py [--n 8] [--size 1GiB] [--tools lt1,autoglm,autoglm-seed] [--json F]

With ``--base REF`` the autoglm rows run for REF's tree (``git archive``, first on
``PYTHONPATH``) and this tree in turn, ``--repeat K`` times, each row with the load
average before and after it (libtorrent's row runs once):

    sudo .venv/bin/python bench/cost_bench.py --n 8 --tools autoglm --no-floor --base main --repeat 2

A smaller mode for profiling one receiver (no root, no namespaces, 127.0.0.1):
``--pair`` starts one `join --seed` node that adopts the model where it lies
(no transfer), then one `join` node bootstrapped from it with no mirror, and
times a `fetch` handed to the second node: every byte crosses peerwire once.
It reports CPU per GiB of the receiving daemon (its main thread and its worker
threads, user and system apart), of the `fetch` command and of the sender;
``--py-spy FILE`` also records the receiver with py-spy (``--threads``,
``--idle`` off) into FILE (speedscope format), and the sender into FILE with
the suffix ``.sender.json``; ``--gil`` keeps only py-spy's samples that hold the GIL (the
interpreter's CPU, not its waits); ``--perf FILE`` records both with
``perf record -g`` instead (the kernel's side of the system time; the sender
into FILE with the suffix ``.sender``). ``--repeat K`` runs K fetches
(fresh output directories, same two daemons) and prints every one.

    .venv/bin/python bench/cost_bench.py --pair [--size 512MiB] [--repeat 3] [--py-spy prof.json]

``--parts`` measures our own data path without libp2p or the engine, in child
processes of the tree under test: the peerwire server (``serve_peerwire``, a
trusted piece goes out by sendfile) and client (``PeerwireConnection``, 4
requests in flight) over 127.0.0.1, each process's CPU per GiB; the server again with
each piece asked for three times in a row (as when several peers fetch a new piece from
its first holder); one libp2p control stream carrying 1,000 48-byte messages each way,
one at a time (about an N=8 node's Haves and Claims per GiB), each end's CPU; and the
store's write path (``Staging.write`` of 8 MiB pieces in the buffers the
tree's peerwire client allocates, at file offsets 1264 + k × 8 MiB as in a
safetensors file, fdatasync every 4). ``--base REF`` runs the
same children against ``git archive REF`` too, interleaved run by run:

    .venv/bin/python bench/cost_bench.py --parts [--base main] [--repeat 5] [--size 512MiB]

``--cold`` starts a fresh ``join --json`` (no bootstrap, byte-compiled
package) K times and reads its user + system CPU from ``/proc/PID/stat`` the
moment it prints ``ready`` (the line that carries the address others join
with: the libp2p host listens, the piece channel is up), then stops it; with
``--base REF`` interleaved with the same for REF:

    .venv/bin/python bench/cost_bench.py --cold [--base main] [--repeat 5]

CPU-seconds are robust to a busy machine (times are not): the table says the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
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
    PROCS,
    REPO,
    MiB,
    _parse_size,
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
        out["sendfile cold, drop-behind"] = host_costs._sendfile_tcp(path, total) / gib
    return out


def _cpu_split(pid: int) -> dict[str, float]:
    """CPU-seconds of a process so far: its main thread and the rest (worker threads, live and dead), user/system."""
    tick = os.sysconf("SC_CLK_TCK")

    def times(path: str) -> tuple[float, float]:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime

    pu, ps = times(f"/proc/{pid}/stat")  # the whole process, exited threads included
    mu, ms = times(f"/proc/{pid}/task/{pid}/stat")
    return {"main_user": mu, "main_sys": ms, "threads_user": pu - mu, "threads_sys": ps - ms}


def run_pair(args: argparse.Namespace) -> int:
    """One sender, one receiver, on 127.0.0.1: where a receiving node's CPU goes (see the module's docstring)."""
    cli = swarm_bench.autoglm_cmd()
    args.workdir.mkdir(parents=True, exist_ok=True)
    run_dir = args.workdir / f"cost-pair-{os.getpid()}"
    runs: list[dict[str, Any]] = []
    with guarded():
        on_cleanup(lambda: shutil.rmtree(run_dir, ignore_errors=True))
        run_dir.mkdir(parents=True)
        model = make_model(args.workdir / "cost-models", args.size)
        if model.manifest is None or model.pub is None:
            print(f"the model has no manifest: {model.error}", file=sys.stderr)
            return 2
        gib = model.total_size / GiB
        seed = swarm_bench.JsonNode(cli + ["--data-dir", str(run_dir / "A"), "join", "--json", "--seed", str(model.manifest),
                                           "--trust", str(model.pub), "--out", str(model.dir)], "")
        _wait_event(seed, "complete", 600)
        addr = seed.addr()
        mirror_url = None
        if args.source == "mirror":  # our own serve-mirror (its CPU is not counted); the receiver joins alone
            mirror = swarm_bench.JsonNode(cli + ["serve-mirror", str(model.dir)], "")
            deadline = time.monotonic() + 30
            while mirror_url is None and time.monotonic() < deadline and mirror.proc.poll() is None:
                mirror_url = next((w for ln in mirror.lines for w in ln.split() if w.startswith("http://")), None)
                time.sleep(0.1)
            if mirror_url is None:
                print(f"serve-mirror printed no URL: {mirror.last_line()}", file=sys.stderr)
                return 1
        for k in range(args.repeat):
            data = run_dir / f"B{k}"  # a fresh receiver each run: nothing of the model in its store
            boot = ["--bootstrap", str(addr)] if mirror_url is None else []
            recv = swarm_bench.JsonNode(cli + ["--data-dir", str(data), "join", "--json", *boot], "")
            _wait_event(recv, "ready", 120)
            if mirror_url is None and swarm_bench.wait_for_mesh(cli, [data], "", 1, 30.0) is None:
                print("the receiver found no session with the sender in 30 s", file=sys.stderr)
                return 1
            time.sleep(1.0)  # start-up's tail (DHT, announcements) out of the measurement
            i0, ia0, t_idle = sum(_cpu_split(recv.proc.pid).values()), sum(_cpu_split(seed.proc.pid).values()), time.monotonic()
            time.sleep(args.idle)
            t_idle = time.monotonic() - t_idle
            idle = (sum(_cpu_split(recv.proc.pid).values()) - i0) / t_idle
            idle_seed = (sum(_cpu_split(seed.proc.pid).values()) - ia0) / t_idle
            a0, b0 = _cpu_split(seed.proc.pid), _cpu_split(recv.proc.pid)
            spy = spy2 = None
            gil = ["--gil"] if args.gil else []
            if args.py_spy and k == 0:
                spy = PROCS.start([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(recv.proc.pid),
                                   "--threads", "--rate", "200", *gil, "--format", "speedscope", "-o", str(args.py_spy)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                spy2 = PROCS.start([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(seed.proc.pid),
                                    "--threads", "--rate", "200", *gil, "--format", "speedscope",
                                    "-o", str(args.py_spy.with_suffix(".sender.json"))],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            if args.strace and k == 0:  # syscall counts per thread group, both daemons
                spy = PROCS.start(["strace", "-c", "-f", "-o", str(args.strace), "-p", str(recv.proc.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                spy2 = PROCS.start(["strace", "-c", "-f", "-o", str(args.strace.with_suffix(".sender")), "-p",
                                    str(seed.proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            if args.perf and k == 0:
                spy = PROCS.start(["perf", "record", "-g", "-F", "499", "-p", str(recv.proc.pid), "-o", str(args.perf)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                spy2 = PROCS.start(["perf", "record", "-g", "-F", "499", "-p", str(seed.proc.pid),
                                    "-o", str(args.perf.with_suffix(".sender"))],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            out = run_dir / f"out{k}"
            r = swarm_bench.measure(cli + ["--data-dir", str(data), "fetch", str(model.manifest), "--trust",
                                           str(model.pub), "--out", str(out), "--json",
                                           *(["--mirror", mirror_url] if mirror_url else [])], timeout=1800)
            a1, b1 = _cpu_split(seed.proc.pid), _cpu_split(recv.proc.pid)
            for p in (spy, spy2):
                if p is not None:
                    p.send_signal(signal.SIGINT)
                    p.wait(60)
            if not r.ok:
                print(f"fetch failed: {r.error()}", file=sys.stderr)
                return 1
            d = {key: (b1[key] - b0[key]) / gib for key in b0}
            row = {"wall": r.wall, **{f"recv_{key}": v for key, v in d.items()},
                   "recv_daemon": sum(d.values()), "fetch_cmd": r.cpu / gib,
                   "sender": sum(a1.values()) - sum(a0.values())}
            row["sender"] /= gib
            row.update({f"send_{key}": (a1[key] - a0[key]) / gib for key in a0})
            kinds: dict[str, int] = {}
            for ev in swarm_bench.parse_json_lines(r.stdout):
                kinds[str(ev.get("event"))] = kinds.get(str(ev.get("event")), 0) + 1
            row["events"] = kinds
            row["idle_cpu_per_s"], row["idle_cpu_per_s_sender"] = idle, idle_seed
            row["recv_total"] = row["recv_daemon"] + row["fetch_cmd"]
            runs.append(row)
            log(f"run {k}: {r.wall:.1f} s; receiver {row['recv_total']:.2f} CPU-s/GiB (main {d['main_user']:.2f} user + "
                f"{d['main_sys']:.2f} sys, threads {d['threads_user']:.2f} user + {d['threads_sys']:.2f} sys, "
                f"fetch command {row['fetch_cmd']:.2f}), sender {row['sender']:.2f} (main {row['send_main_user']:.2f} user + "
                f"{row['send_main_sys']:.2f} sys, threads {row['send_threads_user']:.2f} user + {row['send_threads_sys']:.2f} sys); events {kinds}; idle CPU-s per s: receiver {idle:.3f}, sender {idle_seed:.3f}")
            PROCS.stop(recv.proc, grace=10)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(data, ignore_errors=True)
        PROCS.stop(seed.proc, grace=10)
    load = os.getloadavg()
    rows = [[str(k), f"{r['wall']:.1f} s", f"{r['recv_main_user']:.2f} + {r['recv_main_sys']:.2f}",
             f"{r['recv_threads_user']:.2f} + {r['recv_threads_sys']:.2f}", f"{r['fetch_cmd']:.2f}",
             f"**{r['recv_total']:.2f}**", f"{r['sender']:.2f}"] for k, r in enumerate(runs)]
    print_table(f"One receiver, one sender on 127.0.0.1: {fmt_bytes(model.total_size)} over peerwire "
                f"(load average {load[0]:.1f})",
                ["run", "time", "receiver main thread, user + sys", "receiver worker threads, user + sys",
                 "fetch command", "receiver total", "sender"], rows, note="CPU-seconds per GiB received.")
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "load_after": load, "runs": runs}, indent=2) + "\n")
    return 0


_PART = r"""
import json, os, sys, time
from pathlib import Path
import trio
from autoglm.node import _peerwire as pw
from autoglm.node._store import PieceLocation
P = 8 << 20
MID = b"\x01" * 32
what, path = sys.argv[1], Path(sys.argv[2])
N = os.path.getsize(path) // P
GIB = N * P / (1 << 30)


class Loc:
    def locate(self, mid, i):
        return PieceLocation(path, i * P, P, b"\0" * 32, trusted=True)


class Grant:
    peer_id = "bench"
    def check(self, mid, i): return None
    def served(self, mid, i, n): pass
    def release(self): pass


async def client(port, rounds, times=1):
    conn = await pw.connect_peerwire("127.0.0.1", port, b"t" * 32)
    lim = trio.Semaphore(4)
    async def one(i):
        async with lim:
            for _ in range(times):  # times > 1: as several peers asking for a new piece in turn
                assert len(await conn.fetch(MID, i, P)) == P
    for _ in range(rounds):
        async with trio.open_nursery() as n:
            for i in range(N):
                n.start_soon(one, i)
    await conn.aclose()


async def serve(rounds, times=1):
    async with trio.open_nursery() as n:
        _, port = await n.start(lambda task_status: pw.serve_peerwire(Loc(), lambda t: Grant(), task_status=task_status))
        t0 = time.process_time()
        r = await trio.to_thread.run_sync(lambda: __import__("subprocess").run(
            [sys.executable, "-c", SRC, "client", str(path), str(port), str(rounds), str(times)],
            capture_output=True, text=True, check=True))
        out = json.loads(r.stdout)
        out["server" if times == 1 else f"server_x{times}"] = (time.process_time() - t0) / (GIB * rounds * times)
        if times > 1:
            del out["client"]
        print(json.dumps(out))
        n.cancel_scope.cancel()


def store():
    import shutil, tempfile
    import autoglm.node._staging as S
    head = 1264  # pieces start where the file's tensors do (a safetensors header first), not on 4 KiB
    aligned = getattr(pw, "_page_aligned", None)
    src = os.urandom(P)
    bufs = []
    for k in range(N):
        try:
            b = aligned(P, head + k * P) if aligned else pw._uninitialised(P)
        except TypeError:  # a tree whose _page_aligned takes no offset
            b = aligned(P)
        b[:] = src
        bufs.append(b)
    d = Path(tempfile.mkdtemp(dir=path.parent))
    try:
        st = S.Staging(d, MID, [head + N * P])
        t0 = time.process_time()
        for k in range(N):
            st.write(0, head + k * P, bufs[k], "bench")
            if k % 4 == 3:
                st.sync()
        st.sync()
        print(json.dumps({"store_write": (time.process_time() - t0) / GIB}))
    finally:
        shutil.rmtree(d)


MSG = 48  # bytes: a Have frame is about this size
CTL_ROUNDS = 1000  # each side sends and reads 1,000 messages, one at a time: an N=8 node's Haves and Claims per GiB


async def _exactly(s, n):
    out = b""
    while len(out) < n:
        chunk = await s.receive_some()
        assert chunk, "control stream ended early"
        out += chunk
    return out


async def ctl_server():
    import logging, tempfile
    from autoglm.node._p2p import open_p2p
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    async with open_p2p(Path(tempfile.mkdtemp(dir=path.parent))) as node:
        done = trio.Event()
        cpu = {}

        async def handler(s):
            t0 = time.process_time()
            for _ in range(CTL_ROUNDS):
                await s.send_all(await _exactly(s, MSG))
            cpu["control_b"] = time.process_time() - t0
            done.set()
            await s.aclose()

        node.set_control_handler(handler)
        r = await trio.to_thread.run_sync(lambda: __import__("subprocess").run(
            [sys.executable, "-c", SRC, "ctl_client", str(path), node.addrs()[0]], capture_output=True, text=True, check=True))
        await done.wait()
        print(json.dumps({**json.loads(r.stdout), **cpu}))


async def ctl_client(addr):
    import logging, tempfile
    from autoglm.node._p2p import open_p2p
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    async with open_p2p(Path(tempfile.mkdtemp(dir=path.parent))) as node:
        s = await node.open_control(await node.connect(addr))
        msg = b"h" * MSG
        t0 = time.process_time()
        for _ in range(CTL_ROUNDS):
            await s.send_all(msg)
            await _exactly(s, MSG)
        cpu = time.process_time() - t0
        await s.aclose()
    print(json.dumps({"control_a": cpu}))


if what == "serve":
    trio.run(serve, int(sys.argv[3]))
elif what == "serve3":
    trio.run(serve, 1, 3)
elif what == "control":
    trio.run(ctl_server)
elif what == "ctl_client":
    trio.run(ctl_client, sys.argv[3])
elif what == "client":
    t0 = time.process_time()
    trio.run(client, int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    print(json.dumps({"client": (time.process_time() - t0) / (GIB * int(sys.argv[4]) * int(sys.argv[5]))}))
else:
    store()
"""


def _base_tree(ref: str, work: Path) -> Path:
    """``git archive REF`` of the package, laid out so that PYTHONPATH=<result> imports it ahead of this tree."""
    base = work / "base"
    (base / "autoglm").mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "node", "protocol", "wasm_verify"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base / "autoglm")], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(base)], check=True, stdout=subprocess.DEVNULL)
    return base


def _cold_once(cli: list[str], data: Path, env: dict[str, str]) -> float:
    """CPU-seconds (user + system) of a cold ``join --json`` the moment it prints its ``ready`` line."""
    tick = os.sysconf("SC_CLK_TCK")
    proc = subprocess.Popen(cli + ["--data-dir", str(data), "join", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if '"ready"' in line:
                with open(f"/proc/{proc.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / tick
        raise RuntimeError(f"join exited ({proc.wait()}) without a ready line")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_cold(args: argparse.Namespace) -> int:
    """Cold start: CPU until ``join`` is ready, this tree and optionally a base tree, interleaved."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="cost-cold-"))
    cli = swarm_bench.autoglm_cmd()  # byte-compiles this tree, as pip install would
    trees: dict[str, str | None] = {"this tree": None}
    results: dict[str, list[float]] = {}
    with guarded():
        on_cleanup(lambda: shutil.rmtree(work, ignore_errors=True))
        if args.base:
            trees = {f"base {args.base}": str(_base_tree(args.base, work)), **trees}
        results = {t: [] for t in trees}
        for k in range(args.repeat):
            for name, pp in trees.items():
                data = work / f"d{k}-{len(results[name])}-{name.split()[0]}"
                cpu = _cold_once(cli, data, {**os.environ, "PYTHONPATH": pp or ""})
                shutil.rmtree(data, ignore_errors=True)
                results[name].append(cpu)
                log(f"run {k} {name}: {cpu:.2f} CPU-s to ready (load {os.getloadavg()[0]:.1f})")
    import statistics

    print_table(f"Cold start: CPU-seconds until a fresh `join --json` prints ready (load average {os.getloadavg()[0]:.1f})",
                ["tree", "runs (CPU-s)", "median"],
                [[name, ", ".join(f"{v:.2f}" for v in runs), f"**{statistics.median(runs):.2f}**"] for name, runs in results.items()])
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "results": results}, indent=2) + "\n")
    return 0


def run_parts(args: argparse.Namespace) -> int:
    """Our data path's parts apart, in this tree and optionally a base tree, interleaved (module docstring)."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="cost-parts-"))
    trees: dict[str, str | None] = {"this tree": None}
    with guarded():
        on_cleanup(lambda: shutil.rmtree(work, ignore_errors=True))
        if args.base:
            trees = {f"base {args.base}": str(_base_tree(args.base, work)), **trees}
        blob = work / "pieces.bin"
        total = _parse_size(args.size) // PIECE * PIECE
        with open(blob, "wb") as f:
            for _ in range(total // PIECE):
                f.write(os.urandom(PIECE))
        results: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
        for k in range(args.repeat):
            for name, pp in trees.items():
                env = {**os.environ, "PYTHONPATH": pp or ""}
                row: dict[str, float] = {}
                for what in ("serve", "serve3", "store", "control"):
                    r = subprocess.run([sys.executable, "-c", f"SRC = {_PART!r}\n" + _PART, what, str(blob), "2"],
                                       capture_output=True, text=True, env=env, timeout=600)
                    if r.returncode != 0:
                        print(f"{name}: {what} failed: {r.stderr[-2000:]}", file=sys.stderr)
                        return 1
                    row.update(json.loads(r.stdout.strip().splitlines()[-1]))
                results[name].append(row)
                log(f"run {k} {name}: " + ", ".join(f"{key} {v:.3f}" for key, v in row.items()) + f" (load {os.getloadavg()[0]:.1f})")
    import statistics

    keys = ["server", "server_x3", "client", "store_write", "control_a", "control_b"]
    rows = [[name] + [f"{statistics.median(r[key] for r in runs):.2f} ({', '.join(f'{r[key]:.2f}' for r in runs)})"
                      for key in keys] for name, runs in results.items()]
    print_table(f"Data path parts, {fmt_bytes(total)} (load average {os.getloadavg()[0]:.1f})",
                ["tree", "peerwire server", "server, each piece 3× in a row", "peerwire client",
                 "store write (Staging.write + fdatasync)",
                 "control, dialler", "control, listener"], rows,
                note="CPU-seconds per GiB, median (runs), each run in fresh processes, trees interleaved. Control: CPU-s "
                     "of each end of one libp2p control stream (Noise, yamux) carrying 1,000 48-byte messages each "
                     "way, one at a time (ping-pong): about an N=8 node's Haves and Claims per GiB.")
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "results": results}, indent=2) + "\n")
    return 0


def _wait_event(node: swarm_bench.JsonNode, name: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    while name not in node.events:
        if node.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {name!r} event (exit {node.proc.poll()}): {node.last_line()}")
        node.changed.wait(0.5)
        node.changed.clear()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--cap-mib", type=float, default=50.0, help="mirror egress cap, MiB/s (default 50, as swarm_bench)")
    ap.add_argument("--tools", default="lt1,autoglm,autoglm-seed")
    ap.add_argument("--no-floor", action="store_true", help="skip the host floor rows")
    ap.add_argument("--json", type=Path, metavar="FILE")
    ap.add_argument("--pair", action="store_true", help="one sender, one receiver on 127.0.0.1 (no root); see above")
    ap.add_argument("--repeat", type=int, default=1, help="--pair: fetches to run; --parts, --cold: runs per tree (default 1)")
    ap.add_argument("--py-spy", type=Path, metavar="FILE", help="--pair: record the receiver's first fetch with py-spy")
    ap.add_argument("--source", choices=["peer", "mirror"], default="peer",
                    help="--pair: receive from the seed node over peerwire (default), or from a local serve-mirror alone")
    ap.add_argument("--idle", type=float, default=3.0, help="--pair: seconds to measure both daemons idle first (default 3)")
    ap.add_argument("--strace", type=Path, metavar="FILE", help="--pair: strace -c -f both daemons' first fetch")
    ap.add_argument("--gil", action="store_true", help="--py-spy: only samples holding the GIL (Python's CPU, not waits)")
    ap.add_argument("--perf", type=Path, metavar="FILE", help="--pair: record the receiver's first fetch with perf record -g")
    ap.add_argument("--parts", action="store_true", help="our data path's parts apart (no root); see above")
    ap.add_argument("--base", metavar="REF", help="--parts, --cold, and the autoglm rows at --n: also measure this git "
                                                  "ref's tree, interleaved")
    ap.add_argument("--cold", action="store_true", help="CPU until a cold `join` is ready (no root); see above")
    args = ap.parse_args(argv)
    if args.cold:
        return run_cold(args)
    if args.parts:
        return run_parts(args)
    if args.pair:
        return run_pair(args)
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
        # --base: the autoglm rows of both trees, interleaved --repeat times (libtorrent's once).
        trees: dict[str, str | None] = {"": None}
        if args.base:
            trees = {f" (base {args.base})": str(_base_tree(args.base, run_dir)), " (this tree)": None}
        outer_pythonpath = os.environ.get("PYTHONPATH", "")
        runs = [(key, tree, k) for k in range(args.repeat if args.base else 1) for tree in trees for key in wanted
                if key == "lt1" and k == 0 and tree == list(trees)[-1] or key != "lt1"]
        for key, tree, k in runs:
            label, fn = plan[key]
            label += tree
            log(f"N={n}: {label}")
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (trees[tree], outer_pythonpath) if p)
            os.sync()
            load = os.getloadavg()[0]
            row = fn(n)
            row["load_before"], row["load_after"] = load, os.getloadavg()[0]
            report["rows"][f"{key}{tree} #{k}" if args.base else key] = row
            if args.base:
                label += f" #{k + 1}, load {load:.0f}→{row['load_after']:.0f}"
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
