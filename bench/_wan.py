"""A WAN test bed in network namespaces, shared by bench/wan_bench.py and tests/wan/.

Topology (every namespace is created here, named ``wan<tag>...``, and removed by
:meth:`WanBed.down`; nothing touches the host's own interfaces)::

    wan<tag>o0  origin 0: 10.201.0.1   --htb rate--> veth --+
    wan<tag>o1  origin 1: 10.201.1.1   --htb rate--> veth --+   (one per Link)
                                                            |
    wan<tag>r   router: forwards; NFQUEUE delay/loss on each origin's packets,
                both directions (one nfq_delay process and queue per origin)
                                                            |
    wan<tag>l0  LAN segment 0: 10.202.0.2 (nodes run here)  -+
    wan<tag>l1  LAN segment 1: 10.202.1.2 ...               -+   (``segments``)

The origin links get their delay (RTT/2 each way) and loss (each direction) from
``nfq_delay`` (bench/wan/nfq_delay.c: this kernel has no sch_netem), run in the
router namespace on forwarded packets. TSO/GSO/GRO are off on the origin veths so
that a loss drops one 1448-byte segment, not a 64 KiB super-packet. LAN links
have no delay, loss or cap. :meth:`WanBed.set_link` changes one origin link's
RTT/loss/rate mid-run (the mirror-quality timeline).

The binary is built from bench/wan/nfq_delay.c into a cache directory (never into
the repository). :func:`unavailable` says why the bed cannot run here (not root,
a tool or the libnetfilter_queue header missing, NFQUEUE refused), so tests can
skip with that reason.

Also here: :func:`tcp_transfer`, one plain TCP flow origin -> LAN (iperf-style) to
check a link against Mathis' estimate (:func:`mathis`) and to compare our
channels with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
NFQ_SOURCE = HERE / "wan" / "nfq_delay.c"
CACHE = Path(os.environ.get("AUTOGLM_WAN_CACHE", "/tmp/autoglm-wan"))
TOOLS = ("ip", "iptables", "tc", "ethtool", "gcc")


class WanUnavailable(RuntimeError):
    """The test bed cannot run on this machine (the message says why)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Link:
    """One origin's WAN link: added round-trip time (s), loss per direction, origin egress cap (bytes/s)."""

    rtt: float = 0.1
    loss: float = 0.0
    rate: int | None = None

    def label(self) -> str:
        return f"{self.rtt * 1000:.0f} ms / {self.loss * 100:g} %"


def mathis(rtt: float, loss: float, mss: int = 1448) -> float:
    """Mathis et al.: the steady rate of one loss-based (Reno-like) flow, bytes/s."""
    return mss / rtt * math.sqrt(1.5 / loss) if loss > 0 else math.inf


def _run(argv: Sequence[str], timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {(r.stderr or r.stdout).strip()}")
    return r


def build_nfq_delay() -> Path:
    """Compile nfq_delay.c into CACHE (keyed by the source's hash); the path of the binary."""
    src = NFQ_SOURCE.read_bytes()
    out = CACHE / f"nfq_delay-{hashlib.sha256(src).hexdigest()[:12]}"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}")
    r = _run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(NFQ_SOURCE), "-lnetfilter_queue"], timeout=120, check=False)
    if r.returncode != 0:
        raise WanUnavailable(f"building nfq_delay failed (apt-get install gcc libnetfilter-queue-dev): "
                             f"{r.stderr.strip()[-300:]}")
    tmp.replace(out)
    return out


def unavailable() -> str | None:
    """Why the bed cannot run here, or None. Builds nfq_delay as a side effect."""
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, tc)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (scripts/setup installs them)"
    if not Path("/usr/include/libnetfilter_queue/libnetfilter_queue.h").exists():
        return "missing libnetfilter-queue-dev (scripts/setup installs it)"
    try:
        build_nfq_delay()
    except WanUnavailable as exc:
        return str(exc)
    return None


class WanBed:
    """Origins behind WAN links, a router, LAN segments; see the module docstring."""

    def __init__(self, tag: str, origins: Sequence[Link], *, segments: int = 1, max_seconds: float = 3600.0,
                 tcp_wmem_max: int | None = None) -> None:
        if not origins or segments < 1:
            raise ValueError("need at least one origin and one LAN segment")
        self.tag = tag
        self.links = list(origins)
        self.segments = segments
        self.max_seconds = max_seconds
        self.tcp_wmem_max = tcp_wmem_max
        self.router = f"wan{tag}r"
        self.origin_ns = [f"wan{tag}o{i}" for i in range(len(origins))]
        self.lan_ns = [f"wan{tag}l{j}" for j in range(segments)]
        self._created: list[str] = []
        self._nfq: dict[int, subprocess.Popen[bytes]] = {}
        self._nfq_log: dict[int, Path] = {}
        self._binary: Path | None = None
        self.nfq_stats: list[str] = []  # nfq_delay's exit lines (packets, dropped, overflow)

    # -- addresses -----------------------------------------------------------
    @staticmethod
    def origin_ip(i: int = 0) -> str:
        return f"10.201.{i}.1"

    @staticmethod
    def lan_ip(j: int = 0) -> str:
        return f"10.202.{j}.2"

    def origin_dev(self, i: int) -> str:  # the origin's end of its link (htb lives here)
        return f"wo{i}"

    @staticmethod
    def exec(ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    # -- life cycle ----------------------------------------------------------
    def __enter__(self) -> WanBed:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> WanBed:
        why = unavailable()
        if why:
            raise WanUnavailable(why)
        self._binary = build_nfq_delay()
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _sysctl(self, ns: str, key: str, value: str) -> None:
        _run(self.exec(ns) + ["sysctl", "-q", "-w", f"{key}={value}"])

    def _up(self) -> None:
        r = self.router
        self._ns(r)
        self._sysctl(r, "net.ipv4.ip_forward", "1")
        for i, ns in enumerate(self.origin_ns):
            self._ns(ns)
            dev, rdev = self.origin_dev(i), f"ro{i}"
            # created in the origin namespace, the peer moved straight into the router's
            _run(["ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", rdev, "netns", r])
            _run(["ip", "-n", ns, "addr", "add", f"{self.origin_ip(i)}/24", "dev", dev])
            _run(["ip", "-n", r, "addr", "add", f"10.201.{i}.2/24", "dev", rdev])
            for n, d in ((ns, dev), (r, rdev)):
                _run(["ip", "-n", n, "link", "set", d, "up"])
                _run(self.exec(n) + ["ethtool", "-K", d, "tso", "off", "gso", "off", "gro", "off"])
            _run(["ip", "-n", ns, "route", "add", "default", "via", f"10.201.{i}.2"])
            if self.tcp_wmem_max:
                self._sysctl(ns, "net.ipv4.tcp_wmem", f"4096 16384 {self.tcp_wmem_max}")
            self._shape(i, self.links[i].rate, add=True)
        for j, ns in enumerate(self.lan_ns):
            self._ns(ns)
            dev, rdev = f"wl{j}", f"rl{j}"
            _run(["ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", rdev, "netns", r])
            _run(["ip", "-n", ns, "addr", "add", f"{self.lan_ip(j)}/24", "dev", dev])
            _run(["ip", "-n", r, "addr", "add", f"10.202.{j}.1/24", "dev", rdev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", r, "link", "set", rdev, "up"])
            _run(["ip", "-n", ns, "route", "add", "default", "via", f"10.202.{j}.1"])
        for i in range(len(self.links)):
            q = 10 + i
            for match in (["-i", f"ro{i}"], ["-d", self.origin_ip(i)]):
                _run(self.exec(r) + ["iptables", "-t", "mangle", "-A", "PREROUTING", *match, "-p", "tcp",
                                     "-j", "NFQUEUE", "--queue-num", str(q), "--queue-bypass"])
            self._start_nfq(i)

    def _shape(self, i: int, rate: int | None, add: bool) -> None:
        ns, dev = self.origin_ns[i], self.origin_dev(i)
        if rate is None:
            if not add:
                _run(self.exec(ns) + ["tc", "qdisc", "del", "dev", dev, "root"], check=False)
            return
        bits = rate * 8
        verb = "add" if add else "replace"
        _run(self.exec(ns) + ["tc", "qdisc", verb, "dev", dev, "root", "handle", "1:", "htb", "default", "10"])
        _run(self.exec(ns) + ["tc", "class", verb, "dev", dev, "parent", "1:", "classid", "1:10", "htb",
                              "rate", f"{bits}bit", "ceil", f"{bits}bit", "quantum", "60000"])

    def _start_nfq(self, i: int) -> None:
        link = self.links[i]
        assert self._binary is not None
        log = CACHE / f"nfq-{self.tag}-{i}-{len(self.nfq_stats)}-{time.monotonic_ns()}.log"
        self._nfq_log[i] = log
        with open(log, "wb") as f:
            p = subprocess.Popen(self.exec(self.router) + [str(self._binary), str(10 + i), str(int(link.rtt / 2 * 1e6)),
                                                           repr(link.loss), str(self.max_seconds)],
                                 stdin=subprocess.DEVNULL, stdout=f, stderr=f)
        self._nfq[i] = p
        deadline = time.monotonic() + 10
        while b"nfq_delay: queue" not in log.read_bytes():  # printed once the queue is bound
            if p.poll() is not None or time.monotonic() > deadline:
                self._stop_nfq(i)
                raise WanUnavailable(f"nfq_delay could not bind NFQUEUE {10 + i}: {log.read_text(errors='replace').strip()}")
            time.sleep(0.02)

    def _stop_nfq(self, i: int) -> None:
        p = self._nfq.pop(i, None)
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        log = self._nfq_log.pop(i)
        self.nfq_stats += [f"origin {i}: {ln}" for ln in log.read_text(errors="replace").splitlines() if "packets" in ln]
        log.unlink(missing_ok=True)

    def set_link(self, i: int, link: Link) -> None:
        """Change origin ``i``'s link now: a new nfq_delay on the same queue, htb rate replaced."""
        old = self.links[i]
        self.links[i] = link
        self._stop_nfq(i)
        self._start_nfq(i)
        if link.rate != old.rate:
            self._shape(i, link.rate, add=old.rate is None)

    def down(self) -> None:
        for i in list(self._nfq):
            with contextlib.suppress(Exception):
                self._stop_nfq(i)
        while self._created:
            ns = self._created.pop()
            r = _run(["ip", "netns", "del", ns], check=False)
            if r.returncode != 0:
                print(f"wan: could not delete netns {ns}: {r.stderr.strip()}", file=sys.stderr)

    # -- measuring -------------------------------------------------------------
    def tx_bytes(self, i: int = 0) -> int:
        """Bytes origin ``i`` has sent on its WAN link (headers included): the origin's egress."""
        r = _run(self.exec(self.origin_ns[i]) + ["cat", f"/sys/class/net/{self.origin_dev(i)}/statistics/tx_bytes"])
        return int(r.stdout.strip())


# --------------------------------------------------------------------------- plain TCP

_SENDER = """
import socket, sys, time
cc, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[4], port)); ls.listen(1); ls.settimeout(30)
print("listening", flush=True)
c, _ = ls.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
buf = bytes(1 << 20); end = time.monotonic() + seconds
while time.monotonic() < end:
    c.sendall(buf)
c.close()
"""

_RECEIVER = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
buf = bytearray(1 << 20); n = 0; t0 = time.monotonic(); first = None
while True:
    k = s.recv_into(buf)
    if not k: break
    n += k
print(n, time.monotonic() - t0, flush=True)
"""


def tcp_transfer(bed: WanBed, *, origin: int = 0, lan: int = 0, seconds: float = 10.0, cc: str = "bbr",
                 port: int = 5201) -> float:
    """One plain TCP flow origin -> LAN for ``seconds`` with congestion control ``cc``; bytes/s."""
    sender = subprocess.Popen(bed.exec(bed.origin_ns[origin]) + [sys.executable, "-c", _SENDER, cc, str(port),
                                                                  str(seconds), bed.origin_ip(origin)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert sender.stdout is not None
        if sender.stdout.readline().strip() != "listening":
            raise RuntimeError(f"tcp sender: {sender.stderr.read() if sender.stderr else ''}")
        r = _run(bed.exec(bed.lan_ns[lan]) + [sys.executable, "-c", _RECEIVER, bed.origin_ip(origin), str(port)],
                 timeout=seconds + 60)
        nbytes, wall = r.stdout.split()
        return int(nbytes) / float(wall)
    finally:
        if sender.poll() is None:
            os.kill(sender.pid, signal.SIGKILL)
        sender.wait(timeout=10)


@contextlib.contextmanager
def wan_bed(tag: str, origins: Sequence[Link], **kw: object) -> Iterator[WanBed]:
    bed = WanBed(tag, origins, **kw)  # type: ignore[arg-type]
    bed.up()
    try:
        yield bed
    finally:
        bed.down()


if __name__ == "__main__":  # quick link check: sudo .venv/bin/python bench/_wan.py [RTT_MS LOSS]
    rtt = float(sys.argv[1]) / 1000 if len(sys.argv) > 1 else 0.1
    loss = float(sys.argv[2]) if len(sys.argv) > 2 else 0.01
    with wan_bed(f"chk{os.getpid() % 10000}", [Link(rtt, loss, 50 << 20)]) as b:
        for cc in ("cubic", "bbr"):
            rate = tcp_transfer(b, seconds=8, cc=cc)
            print(f"{cc}: {rate / 1e6:.2f} MB/s; Mathis estimate {mathis(rtt, loss) / 1e6:.2f} MB/s")
        b.down()
        print("\n".join(b.nfq_stats))
