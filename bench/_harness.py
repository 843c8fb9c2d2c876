"""Shared helpers for the benchmarks in bench/.

- :class:`Nginx`: a Debian nginx started with its own config in a temp dir
  (daemon off, pid file, access log with ``$bytes_sent``), stopped by PID.
- :class:`Procs`: every process a benchmark starts, so that all of them are
  ended by PID on exit, error, Ctrl-C or SIGTERM.
- :func:`measure`: wall time, CPU time (``wait4`` rusage) and peak RSS of one
  command, with an optional SIGKILL trigger and a line callback.
- :func:`make_model`: a sample model directory + key + signed manifest through
  our CLI (with a plain-file fallback so the baselines run even if it fails).
- :func:`print_table`: rich when available, plain text otherwise.

Traffic rule: everything here talks only to 127.0.0.1 or to addresses inside
network namespaces the benchmark created itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path("/tmp/autoglm-bench")
GiB = 1 << 30
MiB = 1 << 20


_COMPILED = False


def autoglm_cmd() -> list[str]:
    """The autoglm-node executable: the repo's venv first, then PATH.

    The first call byte-compiles the repo's packages, as ``pip install`` does
    for a wheel: with PYTHONDONTWRITEBYTECODE set (as on the development
    machines) an editable install would otherwise compile every module in
    every process the benchmark starts, and time that no real install spends.
    """
    global _COMPILED
    if not _COMPILED:
        import compileall

        for d in ("node", "protocol", "wasm_verify"):
            compileall.compile_dir(str(REPO / d), quiet=1)
        _COMPILED = True
    venv = REPO / ".venv" / "bin" / "autoglm-node"
    if venv.exists():
        return [str(venv)]
    found = shutil.which("autoglm-node")
    return [found] if found else [sys.executable, "-m", "autoglm.node.cli"]


def netns_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


class Procs:
    """Processes started by this benchmark. Only these are ever signalled, by PID."""

    def __init__(self) -> None:
        self._procs: dict[int, subprocess.Popen[Any]] = {}
        self._lock = threading.Lock()

    def start(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(list(argv), **kw)
        with self._lock:
            self._procs[proc.pid] = proc
        return proc

    def forget(self, proc: subprocess.Popen[Any]) -> None:
        with self._lock:
            self._procs.pop(proc.pid, None)

    def stop(self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        """Signal one of our processes by PID, wait up to ``grace`` s, then SIGKILL."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self.forget(proc)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.05, deadline - time.monotonic()))
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
            self.forget(p)


PROCS = Procs()
_CLEANUPS: list[Callable[[], None]] = []


def on_cleanup(fn: Callable[[], None]) -> None:
    """Run ``fn`` (LIFO) in :func:`cleanup`; used for nginx, namespaces, work dirs."""
    _CLEANUPS.append(fn)


def cleanup() -> None:
    PROCS.stop_all()
    while _CLEANUPS:
        fn = _CLEANUPS.pop()
        try:
            fn()
        except Exception as exc:
            log(f"cleanup step failed: {exc}")


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """SIGTERM/SIGHUP behave like Ctrl-C; everything registered is cleaned up on exit."""
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        # a second Ctrl-C during cleanup must not leave things behind
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            cleanup()
        finally:
            signal.signal(signal.SIGINT, sigint)
            for s, h in old.items():
                signal.signal(s, h)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Result:
    argv: list[str]
    rc: int | None
    wall: float
    cpu_user: float
    cpu_sys: float
    peak_rss: int  # bytes: max(wait4 ru_maxrss, sampled RSS of the process tree)
    stdout: str
    stderr: str
    killed: bool = False
    timed_out: bool = False

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_sys

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def error(self) -> str:
        """One line saying why the command failed (for 'not available: ...')."""
        if self.timed_out:
            return f"timed out after {self.wall:.0f}s"
        lines = [ln.strip() for ln in (self.stderr + "\n" + self.stdout).splitlines() if ln.strip()]
        tail = lines[-1] if lines else ""
        for ln in reversed(lines):
            if "error" in ln.lower():
                tail = ln
                break
        tail = tail.split(" (choose from")[0]
        return f"exit {self.rc}: {tail[:160]}"


def tree_rss(pid: int) -> int:
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return 0
    try:
        p = psutil.Process(pid)
        total = p.memory_info().rss
        for c in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += c.memory_info().rss
        return int(total)
    except psutil.Error:
        return 0


def peak_rss_of(pid: int) -> int:
    """The kernel's high-water mark of a live process's resident memory (VmHWM), in bytes; 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def measure(
    argv: Sequence[str],
    *,
    timeout: float,
    netns: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    kill_when: Callable[[], bool] | None = None,
    on_line: Callable[[str], None] | None = None,
    poll: float = 0.02,
    rss_every: float = 0.1,
) -> Result:
    """Run a command to completion (bounded by ``timeout``) and measure it.

    ``kill_when`` is polled every ``poll`` s; when it returns True the process
    gets SIGKILL (``Result.killed``). ``on_line`` sees each stdout line.
    CPU and ``ru_maxrss`` come from ``wait4`` on the direct child (which
    includes its waited-for descendants); RSS of the whole tree is also sampled.
    """
    full = netns_prefix(netns) + list(argv)
    proc = PROCS.start(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True,
                       errors="replace")
    out_lines: list[str] = []
    err_lines: list[str] = []

    def pump(stream: Any, sink: list[str], cb: Callable[[str], None] | None) -> None:
        for line in stream:
            sink.append(line)
            if len(sink) > 5000:
                del sink[:1000]
            if cb is not None:
                try:
                    cb(line)
                except Exception as exc:
                    err_lines.append(f"[bench] line callback failed: {exc}\n")

    threads = [threading.Thread(target=pump, args=(proc.stdout, out_lines, on_line), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err_lines, None), daemon=True)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    peak = 0
    next_rss = 0.0
    killed = timed_out = False
    status: int | None = None
    ru: Any = None
    try:
        while True:
            pid, st, ru_ = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                status, ru = st, ru_
                break
            now = time.perf_counter()
            if now >= next_rss:
                peak = max(peak, tree_rss(proc.pid))
                next_rss = now + rss_every
            if not killed and kill_when is not None and kill_when():
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
            if now - t0 > timeout and not timed_out:
                timed_out = True
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(poll)
    finally:
        if status is None:  # interrupted: make sure it is gone
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.wait4(proc.pid, 0)
        PROCS.forget(proc)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join(timeout=2)
    maxrss = int(ru.ru_maxrss) * 1024 if ru is not None else 0
    return Result(
        argv=list(argv), rc=proc.returncode, wall=wall,
        cpu_user=ru.ru_utime if ru else 0.0, cpu_sys=ru.ru_stime if ru else 0.0,
        peak_rss=max(peak, maxrss), stdout="".join(out_lines), stderr="".join(err_lines),
        killed=killed, timed_out=timed_out,
    )


def measure_many(argvs: Sequence[Sequence[str]], *, timeout: float, netns: str | None = None,
                 env: dict[str, str] | None = None, poll: float = 0.02, rss_every: float = 0.2) -> list[Result]:
    """Start every command at once; each Result's ``wall`` is its own finish time from the common start.

    Bounded by ``timeout`` (the rest get SIGKILL). CPU and peak RSS are per process, as in :func:`measure`.
    """
    procs = []
    sinks: list[tuple[list[str], list[str]]] = []
    threads = []
    t0 = time.perf_counter()
    for argv in argvs:
        p = PROCS.start(netns_prefix(netns) + list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                        text=True, errors="replace")
        out: list[str] = []
        err: list[str] = []
        for stream, sink in ((p.stdout, out), (p.stderr, err)):
            t = threading.Thread(target=lambda s=stream, k=sink: [k.append(x) for x in s], daemon=True)
            t.start()
            threads.append(t)
        procs.append(p)
        sinks.append((out, err))
    n = len(procs)
    wall: list[float | None] = [None] * n
    rus: list[Any] = [None] * n
    status: list[int | None] = [None] * n
    peak = [0] * n
    timed_out = [False] * n
    next_rss = 0.0
    try:
        while None in status:
            now = time.perf_counter()
            for i, p in enumerate(procs):
                if status[i] is not None:
                    continue
                pid, st, ru = os.wait4(p.pid, os.WNOHANG)
                if pid == p.pid:
                    status[i], rus[i], wall[i] = st, ru, now - t0
                    PROCS.forget(p)
                    p.returncode = os.waitstatus_to_exitcode(st)
                elif now - t0 > timeout and not timed_out[i]:
                    timed_out[i] = True
                    os.kill(p.pid, signal.SIGKILL)
            if now >= next_rss:
                for i, p in enumerate(procs):
                    if status[i] is None:
                        peak[i] = max(peak[i], tree_rss(p.pid))
                next_rss = now + rss_every
            time.sleep(poll)
    finally:
        for i, p in enumerate(procs):
            if status[i] is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.wait4(p.pid, 0)
                PROCS.forget(p)
    for t in threads:
        t.join(timeout=2)
    results = []
    for i, p in enumerate(procs):
        ru = rus[i]
        results.append(Result(
            argv=list(argvs[i]), rc=p.returncode, wall=wall[i] or 0.0,
            cpu_user=ru.ru_utime if ru else 0.0, cpu_sys=ru.ru_stime if ru else 0.0,
            peak_rss=max(peak[i], int(ru.ru_maxrss) * 1024 if ru else 0),
            stdout="".join(sinks[i][0]), stderr="".join(sinks[i][1]), timed_out=timed_out[i]))
    return results


# --------------------------------------------------------------------------- nginx

_LOG_RE = re.compile(r'^(?P<status>\d{3}) (?P<sent>\d+) (?P<body>\d+) "(?P<req>[^"]*)" "(?P<range>[^"]*)" '
                     r'(?P<conn>\d+) (?P<port>\d+)')

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format agbench '$status $bytes_sent $body_bytes_sent "$request" "$http_range" $connection $remote_port $request_time $msec';
    access_log {dir}/access.log agbench;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    types {{ application/json json agm; }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    keepalive_timeout 60s;
    server {{
        listen {listen}:{port} reuseport backlog=4096;
        root {root};
        location / {{
            {limit}
        }}
    }}
}}
"""


class Nginx:
    """nginx from Debian with its own config; ``limit_rate`` is per connection."""

    def __init__(self, root: Path, confdir: Path, *, listen: str = "127.0.0.1", port: int | None = None,
                 limit_rate: str | None = None, netns: str | None = None, workers: int = 2,
                 location_extra: str = "") -> None:
        self.root = root.resolve()
        self.dir = confdir.resolve()
        self.listen = listen
        self.port = port or (free_port(listen) if netns is None else 8080)
        self.limit_rate = limit_rate
        self.netns = netns
        self.workers = workers
        self.location_extra = location_extra  # more directives in `location /` (bench/wan_bench.py: a 429 switch)
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def access_log(self) -> Path:
        return self.dir / "access.log"

    def url(self, rel: str = "") -> str:
        return f"http://{self.listen}:{self.port}/{rel.lstrip('/')}"

    def start(self, timeout: float = 10) -> Nginx:
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        self.access_log.touch()
        limit = (f"limit_rate {self.limit_rate};" if self.limit_rate else "") + self.location_extra
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, workers=self.workers, listen=self.listen, port=self.port,
                                          root=self.root, limit=limit))
        # -e: the startup error log, so nothing is written under /var/log
        argv = netns_prefix(self.netns) + [exe, "-p", str(self.dir), "-e", str(self.dir / "error.log"),
                                           "-c", str(conf)]
        self.proc = PROCS.start(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        on_cleanup(self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"nginx exited ({self.proc.returncode}): {err.strip()}")
            if self._listening():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen on {self.listen}:{self.port} within {timeout}s")

    def _ss(self, *args: str) -> str:
        out = subprocess.run(netns_prefix(self.netns) + ["ss", "-H", *args], capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout

    def _listening(self) -> bool:
        return f"{self.listen}:{self.port}" in self._ss("-ltn", f"sport = :{self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            PROCS.stop(self.proc, signal.SIGTERM, grace=5)  # SIGTERM: nginx fast shutdown, workers exit too
            self.proc = None

    # -- egress accounting ------------------------------------------------
    def mark(self) -> int:
        return self.access_log.stat().st_size

    def requests_since(self, mark: int) -> list[dict[str, Any]]:
        with open(self.access_log, "rb") as f:
            f.seek(mark)
            data = f.read().decode(errors="replace")
        rows = []
        for line in data.splitlines():
            m = _LOG_RE.match(line)
            if m:
                rows.append({"status": int(m["status"]), "sent": int(m["sent"]), "body": int(m["body"]),
                             "request": m["req"], "range": m["range"], "port": int(m["port"])})
        return rows

    def served_since(self, mark: int) -> int:
        """Bytes nginx sent (headers included) on requests logged since ``mark``."""
        return sum(r["sent"] for r in self.requests_since(mark))

    def live_bytes(self, mark: int) -> int:
        """Bytes acknowledged on open connections and not yet in the access log since ``mark``.

        ``bytes_acked`` is per connection and cumulative, so with keep-alive the requests
        already logged on the same connection (same client port) are subtracted.
        """
        out = self._ss("-tin", "state", "established", f"sport = :{self.port}")
        acked: dict[int, int] = {}
        peer = None
        for line in out.splitlines():
            if line and not line[0].isspace():
                peer = int(line.split()[-1].rsplit(":", 1)[1])
            elif peer is not None:
                m = re.search(r"bytes_acked:(\d+)", line)
                if m:
                    acked[peer] = acked.get(peer, 0) + int(m.group(1))
        if not acked:
            return 0
        logged: dict[int, int] = {}
        for r in self.requests_since(mark):
            if r["port"] in acked:
                logged[r["port"]] = logged.get(r["port"], 0) + r["sent"]
        return sum(max(0, a - logged.get(p, 0)) for p, a in acked.items())

    def served_so_far(self, mark: int) -> int:
        """Bytes sent since ``mark``: logged requests + the unlogged part of open connections."""
        return self.served_since(mark) + self.live_bytes(mark)

    def open_connections(self) -> int:
        return len([ln for ln in self._ss("-tn", "state", "established", f"sport = :{self.port}").splitlines()
                    if ln.strip()])

    def settle(self, mark: int, timeout: float = 10.0) -> int:
        """Wait until every connection is closed and logged; return bytes served since ``mark``."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            served = self.served_since(mark)
            if served == last and self.open_connections() == 0:
                return served
            last = served
            time.sleep(0.2)
        return self.served_since(mark)


# --------------------------------------------------------------------------- capped network

MIRROR_IP, CLIENT_IP = "10.200.0.1", "10.200.0.2"


def sh(*argv: str, timeout: float = 30) -> None:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")


class CappedNet:
    """Two namespaces joined by a veth pair; htb caps the mirror side's egress at ``cap`` bytes/s.

    The mirror side holds ``mirror_ips`` (the first is :attr:`mirror_ip`), the
    client side ``client_ip``. The pair is made inside the mirror namespace and
    its peer moved straight into the client one, so the root namespace never
    sees either end. :meth:`up` registers :meth:`down` for cleanup.
    """

    def __init__(self, cap_bytes: int, mirror_ns: str, client_ns: str, *, mirror_ips: Sequence[str] = (MIRROR_IP,),
                 client_ip: str = CLIENT_IP, prefix: int = 30) -> None:
        self.cap = cap_bytes
        self.mirror_ns, self.client_ns = mirror_ns, client_ns
        self.mirror_ips, self.client_ip, self.prefix = tuple(mirror_ips), client_ip, prefix
        self.created: list[str] = []

    @property
    def mirror_ip(self) -> str:
        return self.mirror_ips[0]

    def up(self) -> Self:
        on_cleanup(self.down)
        for ns in (self.mirror_ns, self.client_ns):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        m, c = self.mirror_ns, self.client_ns
        sh("ip", "-n", m, "link", "add", m, "type", "veth", "peer", "name", c, "netns", c)
        for ip in self.mirror_ips:
            sh("ip", "-n", m, "addr", "add", f"{ip}/{self.prefix}", "dev", m)
        sh("ip", "-n", c, "addr", "add", f"{self.client_ip}/{self.prefix}", "dev", c)
        sh("ip", "-n", m, "link", "set", m, "up")
        sh("ip", "-n", c, "link", "set", c, "up")
        bits = self.cap * 8
        sh("ip", "netns", "exec", m, "tc", "qdisc", "add", "dev", m, "root", "handle", "1:", "htb", "default", "10")
        sh("ip", "netns", "exec", m, "tc", "class", "add", "dev", m, "parent", "1:", "classid", "1:10", "htb",
           "rate", f"{bits}bit", "ceil", f"{bits}bit", "quantum", "60000")
        return self

    def down(self) -> None:
        while self.created:
            ns = self.created.pop()
            try:
                sh("ip", "netns", "del", ns)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                log(f"could not delete netns {ns}: {exc}")


def start_mirror(root: Path, confdir: Path, netns: str, ip: str, *, nginx: Callable[..., Nginx] = Nginx,
                 **opts: Any) -> Nginx:
    """nginx (``nginx``: Nginx or a subclass) serving ``root`` on ``ip``:8080 inside the benchmark's namespace
    ``netns``; stopped at cleanup. The mirror every namespaced benchmark starts (CappedNet's or a WAN bed's)."""
    return nginx(root, confdir, listen=ip, netns=netns, **opts).start()


# --------------------------------------------------------------------------- model


@dataclasses.dataclass
class Model:
    dir: Path
    big_file: Path  # the largest file (what curl/aria2c fetch)
    total_size: int  # all files
    manifest: Path | None
    key: Path | None
    pub: Path | None
    error: str | None  # why the autoglm rows cannot run, if the CLI failed

    @property
    def big_size(self) -> int:
        return self.big_file.stat().st_size


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?", text.strip().lower())
    if not m:
        raise ValueError(f"not a size: {text}")
    return int(float(m[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m[2]])


def make_model(base: Path, size: str, name: str = "bench") -> Model:
    """A sample model dir + key + signed manifest via our CLI, reused when already there.

    If ``sample-model`` fails, a plain pseudo-random file is written instead so the
    baseline rows still run; if keygen/publish fail, ``Model.error`` says why.
    """
    cli = autoglm_cmd()
    nbytes = _parse_size(size)
    mdir = base / f"model-{size}"
    stamp = base / f"model-{size}.ok"
    data = base / "publisher-data"
    key, man = base / "publisher.key", base / f"model-{size}.agm"
    if not stamp.exists():
        shutil.rmtree(mdir, ignore_errors=True)
        base.mkdir(parents=True, exist_ok=True)
        log(f"writing a {size} sample model to {mdir}")
        r = measure(cli + ["--data-dir", str(data), "sample-model", str(mdir), "--size", size], timeout=1800)
        if not r.ok:
            log(f"sample-model failed ({r.error()}); writing a plain random file instead")
            mdir.mkdir(parents=True, exist_ok=True)
            with open(mdir / "model.bin", "wb") as f:
                left = nbytes
                while left:
                    chunk = os.urandom(min(left, 16 * MiB))
                    f.write(chunk)
                    left -= len(chunk)
        error = None
        if not key.exists():
            r = measure(cli + ["--data-dir", str(data), "keygen", "--out", str(key)], timeout=60)
            if not r.ok:
                error = f"keygen: {r.error()}"
        if error is None:
            man.unlink(missing_ok=True)
            r = measure(cli + ["--data-dir", str(data), "publish", str(mdir), "--key", str(key), "--name", name,
                               "--version", size, "--out", str(man), "--json"], timeout=1800)
            if not r.ok:
                error = f"publish: {r.error()}"
        stamp.write_text(json.dumps({"error": error}))
    error = json.loads(stamp.read_text()).get("error")
    files = sorted((p for p in mdir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    return Model(dir=mdir, big_file=files[-1], total_size=sum(p.stat().st_size for p in files),
                 manifest=man if man.exists() and error is None else None,
                 key=key if key.exists() else None,
                 pub=Path(str(key) + ".pub") if Path(str(key) + ".pub").exists() else None, error=error)


def same_bytes(a: Path, b: Path) -> bool:
    """Byte-for-byte comparison (cmp), used to check downloads."""
    if not b.exists() or a.stat().st_size != b.stat().st_size:
        return False
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False, timeout=600).returncode == 0


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                v = json.loads(line)
                if isinstance(v, dict):
                    out.append(v)
    return out


# --------------------------------------------------------------------------- output


def median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def fmt_rate(nbytes: float | None, seconds: float | None) -> str:
    if not nbytes or not seconds:
        return "—"
    return f"{nbytes / seconds / 1e9:.2f} GB/s" if nbytes / seconds >= 1e9 else f"{nbytes / seconds / 1e6:.0f} MB/s"


def fmt_num(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], note: str | None = None) -> None:
    """A table on stdout: rich if it is installed and stdout is a terminal, else Markdown-style plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None  # type: ignore[assignment,misc]
    if Console is not None and sys.stdout.isatty():
        table = Table(title=title)
        for c in columns:
            table.add_column(c, overflow="fold")
        for r in rows:
            table.add_row(*[str(x) for x in r])
        Console().print(table)
        if note:
            Console().print(note)
        return
    # plain Markdown: readable in a terminal and pastes into docs/benchmarks.md
    print(f"\n### {title}\n")
    cells = [list(columns)] + [[str(x) for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    if note:
        print(f"\n{note}")
    sys.stdout.flush()


def check_tools(names: Sequence[str]) -> dict[str, str | None]:
    return {n: shutil.which(n) for n in names}
