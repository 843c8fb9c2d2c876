#!/usr/bin/env python3
"""Peers behind NAT: a namespace topology with iptables MASQUERADE, and which path pieces take.

Topology (root only; every namespace and link is created here and removed on exit):

    PREFIX-pub  "public" segment 11.77.0.0/24 (addresses Python counts as global,
                 so the dial policy treats them as public; nothing routes out)
       .2 bootstrap   .3 seeder   .4 .5 public leeches
          | veth
    PREFIX-gw   NAT: 11.77.0.1 outside, 10.78.0.1 inside; MASQUERADE out,
                 FORWARD drops every new connection from outside in
          | veth
    PREFIX-priv private segment 10.78.0.0/24: .2 the NATed node (default route via the NAT)

Phases (each an ``autoglm-node join --json --seed M`` process):
1. the seeder holds the model (its files are already there);
2. the NATed node fetches it from the seeder (it dials out: direct);
3. public leech A fetches while both the seeder and the NATed node serve
   (pieces from the NATed node come over reverse-dialled connections);
4. the seeder stops; public leech B fetches with the NATed node as the only
   holder (every piece must come from behind the NAT).

With ``--topology two`` (``NatNet(segments=2)``) a second NAT, PREFIX-gw2 on
its own outside link 11.79.0.0/24, puts PREFIX-priv2 (10.79.0.0/24) behind it,
and :func:`run_two_nats` runs: a relay (``join --relay``, everyone's bootstrap
peer), NATed node A fetching from a mirror, NATed node B behind the other NAT
fetching with A the only holder (through the relay), then a public node.

Each node's ``status --json`` says how its peerwire client connections were
made (``peerwire_paths``: direct, reverse, relayed) and the bytes each path carried.

    sudo .venv/bin/python bench/nat_bench.py [--size 64MiB] [--topology one|two|both]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _harness import (  # noqa: E402
    PROCS,
    autoglm_cmd,
    guarded,
    make_model,
    on_cleanup,
    print_table,
    same_bytes,
)

PUB_NET, PRIV_NET = "11.77.0", "10.78.0"
PUB2_NET, PRIV2_NET = "11.79.0", "10.79.0"  # the second NAT's outside link and its private segment


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=30)


def nat_unavailable() -> str | None:
    """Why the NAT topology cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 iptables)"
    return None


@dataclass
class NatNet:
    """The three namespaces and their links. ``up()``, then ``down()`` (registered for cleanup)."""

    prefix: str = "nat"
    segments: int = 1  # NATed segments: 1, or 2 (PREFIX-gw2 and PREFIX-priv2, docs/nat.md)
    #: The NATs drop new connections to their own outside address, as a home router does,
    #: instead of answering with a reset (Linux with no INPUT rules).
    silent: bool = False
    #: The NATs map every new connection to a fresh random outside port (MASQUERADE
    #: --random-fully: a symmetric NAT, as carrier-grade NATs are): the port a relay saw is
    #: not the port a hole-punch dial leaves from, so no punch can work. Without it Linux
    #: keeps the source port, and a punch whose SYNs cross can succeed even on NATs that reset.
    symmetric: bool = False
    made: list[str] = field(default_factory=list)

    @property
    def pub(self) -> str:
        return f"{self.prefix}-pub"

    @property
    def gw(self) -> str:
        return f"{self.prefix}-gw"

    @property
    def priv(self) -> str:
        return f"{self.prefix}-priv"

    @property
    def gw2(self) -> str:
        return f"{self.prefix}-gw2"

    @property
    def priv2(self) -> str:
        return f"{self.prefix}-priv2"

    @property
    def _masq_opts(self) -> tuple[str, ...]:
        return ("--random-fully",) if self.symmetric else ()

    def ns(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _sh("ip", "netns", "exec", ns, *argv, check=check)

    def up(self) -> NatNet:
        on_cleanup(self.down)
        for ns in (self.pub, self.gw, self.priv, *((self.gw2, self.priv2) if self.segments > 1 else ())):
            _sh("ip", "netns", "del", ns, check=False)
            _sh("ip", "netns", "add", ns)
            self.made.append(ns)
            self.ns(ns, "ip", "link", "set", "lo", "up")
        p = self.prefix
        # veth names are at most 15 bytes: PREFIX is short (tests use nat + a digit).
        _sh("ip", "link", "add", f"{p}-gwo", "netns", self.gw, "type", "veth", "peer", "name", f"{p}-pubi", "netns", self.pub)
        _sh("ip", "link", "add", f"{p}-gwi", "netns", self.gw, "type", "veth", "peer", "name", f"{p}-privi", "netns", self.priv)
        self.ns(self.pub, "ip", "addr", "add", f"{PUB_NET}.2/24", "dev", f"{p}-pubi")
        for host in (3, 4, 5, 6):
            self.ns(self.pub, "ip", "addr", "add", f"{PUB_NET}.{host}/24", "dev", f"{p}-pubi")
        self.ns(self.pub, "ip", "link", "set", f"{p}-pubi", "up")
        self.ns(self.gw, "ip", "addr", "add", f"{PUB_NET}.1/24", "dev", f"{p}-gwo")
        self.ns(self.gw, "ip", "addr", "add", f"{PRIV_NET}.1/24", "dev", f"{p}-gwi")
        self.ns(self.gw, "ip", "link", "set", f"{p}-gwo", "up")
        self.ns(self.gw, "ip", "link", "set", f"{p}-gwi", "up")
        self.ns(self.priv, "ip", "addr", "add", f"{PRIV_NET}.2/24", "dev", f"{p}-privi")
        self.ns(self.priv, "ip", "link", "set", f"{p}-privi", "up")
        self.ns(self.priv, "ip", "route", "add", "default", "via", f"{PRIV_NET}.1")
        self.ns(self.gw, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        ipt = ("iptables", "-w", "5")
        self.ns(self.gw, *ipt, "-t", "nat", "-A", "POSTROUTING", "-s", f"{PRIV_NET}.0/24", "-o", f"{p}-gwo", "-j", "MASQUERADE", *self._masq_opts)
        self.ns(self.gw, *ipt, "-A", "FORWARD", "-i", f"{p}-gwo", "-o", f"{p}-gwi", "-m", "conntrack",
                "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        self.ns(self.gw, *ipt, "-A", "FORWARD", "-i", f"{p}-gwo", "-o", f"{p}-gwi", "-j", "DROP")
        if self.segments > 1:
            self._second_nat()
        if self.silent:
            for gw, out in ((self.gw, f"{p}-gwo"), *(((self.gw2, f"{p}-g2o"),) if self.segments > 1 else ())):
                self.ns(gw, *ipt, "-A", "INPUT", "-i", out, "-p", "tcp", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
        return self

    def _second_nat(self) -> None:
        """PREFIX-gw2 on its own outside link 11.79.0.0/24 (the public namespace routes between the two)."""
        p = self.prefix
        _sh("ip", "link", "add", f"{p}-g2o", "netns", self.gw2, "type", "veth", "peer", "name", f"{p}-pub2", "netns", self.pub)
        _sh("ip", "link", "add", f"{p}-g2i", "netns", self.gw2, "type", "veth", "peer", "name", f"{p}-prv2", "netns", self.priv2)
        self.ns(self.pub, "ip", "addr", "add", f"{PUB2_NET}.2/24", "dev", f"{p}-pub2")
        self.ns(self.pub, "ip", "link", "set", f"{p}-pub2", "up")
        self.ns(self.pub, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        self.ns(self.gw2, "ip", "addr", "add", f"{PUB2_NET}.1/24", "dev", f"{p}-g2o")
        self.ns(self.gw2, "ip", "addr", "add", f"{PRIV2_NET}.1/24", "dev", f"{p}-g2i")
        self.ns(self.gw2, "ip", "link", "set", f"{p}-g2o", "up")
        self.ns(self.gw2, "ip", "link", "set", f"{p}-g2i", "up")
        self.ns(self.priv2, "ip", "addr", "add", f"{PRIV2_NET}.2/24", "dev", f"{p}-prv2")
        self.ns(self.priv2, "ip", "link", "set", f"{p}-prv2", "up")
        self.ns(self.priv2, "ip", "route", "add", "default", "via", f"{PRIV2_NET}.1")
        # Each NAT reaches the other's outside address through the public namespace.
        self.ns(self.gw, "ip", "route", "add", "default", "via", f"{PUB_NET}.2")
        self.ns(self.gw2, "ip", "route", "add", "default", "via", f"{PUB2_NET}.2")
        self.ns(self.gw2, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        ipt = ("iptables", "-w", "5")
        self.ns(self.gw2, *ipt, "-t", "nat", "-A", "POSTROUTING", "-s", f"{PRIV2_NET}.0/24", "-o", f"{p}-g2o", "-j", "MASQUERADE", *self._masq_opts)
        self.ns(self.gw2, *ipt, "-A", "FORWARD", "-i", f"{p}-g2o", "-o", f"{p}-g2i", "-m", "conntrack",
                "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        self.ns(self.gw2, *ipt, "-A", "FORWARD", "-i", f"{p}-g2o", "-o", f"{p}-g2i", "-j", "DROP")

    def down(self) -> None:
        while self.made:
            _sh("ip", "netns", "del", self.made.pop(), check=False)

    def probe(self, listen_ns: str, host: str, dial_ns: str) -> str:
        """Listen on ``host`` in ``listen_ns``, dial it from ``dial_ns``: 'from IP' (as seen by the listener) or 'none'."""
        probe = (
            "import socket,sys\n"
            "s=socket.socket();s.settimeout(2)\n"
            "try:\n s.connect((sys.argv[1],int(sys.argv[2])));print('connected')\n"
            "except OSError as e:print('failed',e)\n"
        )
        accept = (
            "import socket,sys\n"
            "l=socket.socket();l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);l.bind((sys.argv[1],7999));l.listen()\n"
            "l.settimeout(5);print('up',flush=True)\n"
            "try:\n c,a=l.accept();print('from',a[0],flush=True)\n"
            "except OSError:print('none',flush=True)\n"
        )
        srv = subprocess.Popen(["ip", "netns", "exec", listen_ns, sys.executable, "-c", accept, host],
                               stdout=subprocess.PIPE, text=True)
        try:
            assert srv.stdout is not None
            srv.stdout.readline()
            self.ns(dial_ns, sys.executable, "-c", probe, host, "7999", check=False)
            out, _ = srv.communicate(timeout=10)
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()
        return out.strip()

    def check(self) -> str | None:
        """None if the NATs work: private reaches public (seen as its NAT's address), nothing reaches a private segment."""
        want = [(self.pub, f"{PUB_NET}.3", self.priv, f"from {PUB_NET}.1"), (self.priv, f"{PRIV_NET}.2", self.pub, "none")]
        if self.segments > 1:
            want += [(self.pub, f"{PUB_NET}.3", self.priv2, f"from {PUB2_NET}.1"), (self.priv2, f"{PRIV2_NET}.2", self.pub, "none"),
                     (self.priv2, f"{PRIV2_NET}.2", self.priv, "none"), (self.priv, f"{PRIV_NET}.2", self.priv2, "none")]
        for listen_ns, host, dial_ns, expected in want:
            got = self.probe(listen_ns, host, dial_ns)
            if got != expected:
                return f"{dial_ns} -> {host} in {listen_ns}: expected {expected!r}, got {got!r}"
        return None


class Node:
    """One ``autoglm-node join --json`` in a namespace; JSON events collected as they come."""

    def __init__(self, name: str, ns: str, ip: str, data: Path, extra: list[str]) -> None:
        self.name, self.ns, self.ip, self.data = name, ns, ip, data
        argv = ["ip", "netns", "exec", ns, *autoglm_cmd(), "-v", "--data-dir", str(data), "join", "--json",
                "--listen", f"/ip4/{ip}/tcp/4001", "--peerwire", f"{ip}:0", *extra]
        self.proc = PROCS.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                if line.startswith("{"):
                    try:
                        self.events.append(json.loads(line))
                    except ValueError:
                        pass
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for ev in self.events:
                    if ev.get("event") == event:
                        return ev
                    if ev.get("event") == "seed-failed":
                        raise RuntimeError(f"{self.name}: {ev.get('message')}")
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "".join(self.lines[-8:])
                    raise RuntimeError(f"{self.name}: no {event!r} in {timeout:.0f} s (rc {self.proc.poll()}):\n{tail}")
                self.changed.wait(min(left, 1.0))

    def status(self) -> dict[str, Any]:
        r = subprocess.run(["ip", "netns", "exec", self.ns, *autoglm_cmd(), "--data-dir", str(self.data), "status", "--json"],
                           capture_output=True, text=True, timeout=30, check=False)
        try:
            out: dict[str, Any] = json.loads(r.stdout)
        except ValueError:
            return {}
        return out

    def stop(self) -> None:
        PROCS.stop(self.proc, grace=10)
        logs = os.environ.get("AUTOGLM_BENCH_LOGS")
        if logs:
            Path(logs).mkdir(parents=True, exist_ok=True)
            (Path(logs) / f"nat-{self.name}.log").write_text("".join(self.lines))


def _paths(st: dict[str, Any]) -> dict[str, Any]:
    swarm = st.get("swarm", st)
    found = swarm.get("peerwire_paths") if isinstance(swarm, dict) else None
    return found or {"connections": {}, "bytes": {}, "failed": {}, "served_by_reverse_dial": 0, "served_relayed": 0}


def _same_tree(a: Path, b: Path) -> bool:
    """Every file under ``a`` is under ``b`` with the same bytes."""
    files = [p for p in a.rglob("*") if p.is_file()]
    return bool(files) and all(same_bytes(p, b / p.relative_to(a)) for p in files)


@dataclass
class NatRun:
    """What one run of the scenario measured."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    identical: dict[str, bool] = field(default_factory=dict)
    peer_ids: dict[str, str] = field(default_factory=dict)  # node name -> libp2p peer id


def run_scenario(net: NatNet, model: Any, work: Path, timeout: float = 300.0, leeches: int = 2) -> NatRun:
    """Phases 1-4 of the module docstring; raises RuntimeError with the node's last lines on failure."""
    trust = ["--trust", str(model.pub)]
    man = str(model.manifest)
    res = NatRun()
    nodes: list[Node] = []
    mirror: subprocess.Popen[Any] | None = None
    try:
        boot = Node("bootstrap", net.pub, f"{PUB_NET}.2", work / "boot", [])
        nodes.append(boot)
        baddr = boot.wait("ready", 60)["addrs"][0]
        res.peer_ids["bootstrap"] = boot.wait("ready", 1)["peer_id"]
        # The seeder gets its copy from an HTTP mirror on the public segment, then serves it.
        mirror = PROCS.start(["ip", "netns", "exec", net.pub, *autoglm_cmd(), "--data-dir", str(work / "mirror"),
                              "serve-mirror", "--listen", f"{PUB_NET}.6:8080", str(model.dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seeder = Node("seeder", net.pub, f"{PUB_NET}.3", work / "seeder",
                      ["--bootstrap", baddr, "--seed", man, "--mirror", f"http://{PUB_NET}.6:8080/",
                       "--out", str(work / "seeder-out"), *trust])
        nodes.append(seeder)
        seeder.wait("complete", timeout)
        res.peer_ids["seeder"] = seeder.wait("ready", 1)["peer_id"]
        PROCS.stop(mirror)  # from here on, pieces come from peers only
        natted = Node("natted", net.priv, f"{PRIV_NET}.2", work / "natted",
                      ["--bootstrap", baddr, "--seed", man, "--out", str(work / "natted-out"), *trust])
        nodes.append(natted)
        res.peer_ids["natted"] = natted.wait("ready", 60)["peer_id"]
        t0 = time.monotonic()
        done = natted.wait("complete", timeout)
        res.rows.append({"phase": "NATed node fetches", "node": "natted", "seconds": time.monotonic() - t0,
                         "fetch_s": done.get("seconds"),
                         "by_source": done.get("bytes_by_source", {}), "paths": _paths(natted.status())})
        res.identical["natted"] = _same_tree(model.dir, work / "natted-out")
        for i in range(leeches):
            last = i == leeches - 1
            if last:  # the NATed node is left the only holder
                for n in nodes:
                    if n.name == "seeder" or n.name.startswith("leech"):
                        n.stop()
            name = "public-B (NATed node only holder)" if last else "public-A (seeder + NATed node)"
            leech = Node(f"leech{i}", net.pub, f"{PUB_NET}.{4 + i}", work / f"leech{i}",
                         ["--bootstrap", baddr, "--seed", man, "--out", str(work / f"leech{i}-out"), *trust])
            nodes.append(leech)
            res.peer_ids[leech.name] = leech.wait("ready", 60)["peer_id"]
            t0 = time.monotonic()
            done = leech.wait("complete", timeout)
            res.rows.append({"phase": name, "node": f"leech{i}", "seconds": time.monotonic() - t0,
                             "fetch_s": done.get("seconds"),
                             "by_source": done.get("bytes_by_source", {}), "paths": _paths(leech.status())})
            res.identical[f"leech{i}"] = _same_tree(model.dir, work / f"leech{i}-out")
        res.rows.append({"phase": "(NATed node, serving)", "node": "natted", "seconds": None, "by_source": {},
                         "paths": _paths(natted.status()), "status": natted.status()})
    finally:
        for n in reversed(nodes):
            n.stop()
        if mirror is not None:
            PROCS.stop(mirror)
    return res


def run_two_nats(net: NatNet, model: Any, work: Path, timeout: float = 300.0, public_leech: bool = True,
                 relay_apart: bool = False) -> NatRun:
    """Two NATed segments (``NatNet(segments=2)``): pieces between two NATed nodes go through a relay.

    1. the relay (``join --relay``, also everyone's bootstrap peer) starts on the public segment;
       with ``relay_apart`` the bootstrap peer is a plain node and the relay another public node
       that bootstraps from it: the NATed nodes learn of the relay from the DHT (its provider
       record under node/_relays.py's ``RELAY_PROVIDER_KEY``), not from their command line;
    2. NATed node A fetches the model from an HTTP mirror on the public segment, which then stops;
    3. NATed node B, behind the other NAT, fetches with A the only holder: neither can dial the
       other nor be dialled back, so the session and every piece go through the relay;
    4. (``public_leech``) a public node fetches with A and B holding: reverse-dialled connections.
    """
    trust = ["--trust", str(model.pub)]
    man = str(model.manifest)
    res = NatRun()
    nodes: list[Node] = []
    mirror: subprocess.Popen[Any] | None = None

    def fetch(node: Node, phase: str) -> None:
        res.peer_ids[node.name] = node.wait("ready", 60)["peer_id"]
        t0 = time.monotonic()
        done = node.wait("complete", timeout)
        res.rows.append({"phase": phase, "node": node.name, "seconds": time.monotonic() - t0, "fetch_s": done.get("seconds"),
                         "by_source": done.get("bytes_by_source", {}), "paths": _paths(node.status())})
        res.identical[node.name] = _same_tree(model.dir, work / f"{node.name}-out")

    try:
        if relay_apart:
            boot = Node("bootstrap", net.pub, f"{PUB_NET}.2", work / "boot", [])
            nodes.append(boot)
            baddr = boot.wait("ready", 60)["addrs"][0]
            res.peer_ids["bootstrap"] = boot.wait("ready", 1)["peer_id"]
            relay = Node("relay", net.pub, f"{PUB_NET}.3", work / "relay", ["--relay", "--bootstrap", baddr])
            nodes.append(relay)
            res.peer_ids["relay"] = relay.wait("ready", 60)["peer_id"]
        else:
            relay = Node("relay", net.pub, f"{PUB_NET}.2", work / "relay", ["--relay"])
            nodes.append(relay)
            baddr = relay.wait("ready", 60)["addrs"][0]
            res.peer_ids["relay"] = relay.wait("ready", 1)["peer_id"]
        mirror = PROCS.start(["ip", "netns", "exec", net.pub, *autoglm_cmd(), "--data-dir", str(work / "mirror"),
                              "serve-mirror", "--listen", f"{PUB_NET}.6:8080", str(model.dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nat_a = Node("natA", net.priv, f"{PRIV_NET}.2", work / "natA",
                     ["--bootstrap", baddr, "--seed", man, "--mirror", f"http://{PUB_NET}.6:8080/",
                      "--out", str(work / "natA-out"), *trust])
        nodes.append(nat_a)
        fetch(nat_a, "NATed A fetches from the mirror")
        PROCS.stop(mirror)  # from here on, pieces come from peers only
        nat_b = Node("natB", net.priv2, f"{PRIV2_NET}.2", work / "natB",
                     ["--bootstrap", baddr, "--seed", man, "--out", str(work / "natB-out"), *trust])
        nodes.append(nat_b)
        fetch(nat_b, "NATed B (other NAT), A the only holder")
        if public_leech:
            leech = Node("leech0", net.pub, f"{PUB_NET}.4", work / "leech0",
                         ["--bootstrap", baddr, "--seed", man, "--out", str(work / "leech0-out"), *trust])
            nodes.append(leech)
            fetch(leech, "public node, A and B holding")
        for n in (nat_a, nat_b):
            st = n.status()
            res.rows.append({"phase": f"({n.name}, serving)", "node": n.name, "seconds": None, "by_source": {},
                             "paths": _paths(st), "status": st})
        res.rows.append({"phase": "(relay)", "node": "relay", "seconds": None, "by_source": {}, "paths": {},
                         "status": relay.status()})
    finally:
        _stop_all(nodes)
        if mirror is not None:
            PROCS.stop(mirror)
    return res


def _stop_all(nodes: list[Node]) -> None:
    """Stop the nodes at once (each may take its grace period), not one after another."""
    threads = [threading.Thread(target=n.stop) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _by_role(by_source: dict[str, int], peer_ids: dict[str, str]) -> str:
    names = {f"peer:{pid}": name for name, pid in peer_ids.items()}
    total = sum(by_source.values()) or 1
    return ", ".join(f"{names.get(k, k)} {100 * v / total:.0f} %" for k, v in sorted(by_source.items())) or "-"


_PATH_KEYS = ("direct", "reverse", "libp2p", "relayed")  # libp2p: peerwire on a direct (hole-punched) libp2p connection


def _table(title: str, run: NatRun) -> list[list[str]]:
    rows = []
    for r in run.rows:
        paths = r["paths"]
        if not paths:
            continue
        b = paths.get("bytes", {})
        c = paths.get("connections", {})
        total = sum(b.values()) or 1
        rows.append([r["phase"], f"{r['seconds']:.1f} s" if r["seconds"] is not None else "-",
                     f"{r['fetch_s']:.1f} s" if r.get("fetch_s") is not None else "-",
                     _by_role(r["by_source"], run.peer_ids),
                     " / ".join(str(c.get(k, 0)) for k in _PATH_KEYS),
                     " / ".join(f"{100 * b.get(k, 0) / total:.0f} %" for k in _PATH_KEYS),
                     str(paths.get("failed", {}).get("direct", 0)),
                     f"{paths.get('served_by_reverse_dial', 0)} / {paths.get('served_relayed', 0)}",
                     str(run.identical.get(r["node"], "-")) if r["seconds"] is not None else "-"])
    print_table(title, ["phase", "start to complete", "fetch", "bytes by source", "conns direct / reverse / libp2p / relayed",
                        "peer bytes direct / reverse / libp2p / relayed", "direct dials failed",
                        "served: reverse dials / relayed streams", "byte-identical"], rows)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="64MiB", help="model size (default 64MiB)")
    ap.add_argument("--prefix", default="nat", help="namespace name prefix (default nat)")
    ap.add_argument("--topology", choices=("one", "two", "both"), default="both",
                    help="one NATed segment (reverse dial), two (relay), or both in turn (default)")
    ap.add_argument("--silent", action="store_true",
                    help="the NATs drop new connections to their outside address (a home router) instead of resetting them")
    ap.add_argument("--symmetric", action="store_true",
                    help="the NATs map each connection to a random outside port (MASQUERADE --random-fully): no hole punch can work")
    ap.add_argument("--relay-apart", action="store_true",
                    help="two NATs: the bootstrap node relays nothing; the relay is another public node, found in the DHT")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    why = nat_unavailable()
    if why:
        print(f"nat_bench: {why}", file=sys.stderr)
        return 2
    out: dict[str, Any] = {}
    with guarded(), tempfile.TemporaryDirectory(prefix="nat-bench-") as tmp:
        work = Path(tmp)
        model = make_model(work / "model", args.size, name="nat")
        if model.manifest is None:
            print(f"nat_bench: cannot make the model: {model.error}", file=sys.stderr)
            return 1
        for topo in ("one", "two") if args.topology == "both" else (args.topology,):
            net = NatNet(args.prefix, segments=1 if topo == "one" else 2, silent=args.silent,
                         symmetric=args.symmetric).up()
            bad = net.check()
            if bad:
                print(f"nat_bench: the NAT is not in place: {bad}", file=sys.stderr)
                return 1
            sub = work / topo
            sub.mkdir()
            if topo == "one":
                run = run_scenario(net, model, sub, args.timeout)
                title = f"Peers behind NAT: one NATed segment, {args.size} model (bench/nat_bench.py)"
            else:
                run = run_two_nats(net, model, sub, args.timeout, relay_apart=args.relay_apart)
                title = f"Peers behind NAT: two NATed segments and a relay, {args.size} model (bench/nat_bench.py)"
            net.down()
            _table(title, run)
            for r in run.rows:
                if r["node"] == "relay":
                    st = r.get("status", {})
                    swarm = st.get("swarm", st)
                    relay = swarm.get("relay", {}) if isinstance(swarm, dict) else {}
                    print(f"relay: {relay.get('relayed_bytes', 0)} bytes copied for circuits (both directions), "
                          f"{swarm.get('down_bytes', 0) if isinstance(swarm, dict) else 0} piece bytes fetched itself")
                if r["node"] in ("natA", "natB") and r["seconds"] is None:
                    st = r.get("status", {})
                    relay = (st.get("swarm") or st).get("relay", {})
                    print(f"{r['node']}: hole punches tried {relay.get('hole_punch_tried', 0)}, "
                          f"direct connections from them {relay.get('hole_punched', 0)}")
            out[topo] = {"rows": run.rows, "identical": run.identical}
        if args.json:
            args.json.write_text(json.dumps(out, default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
