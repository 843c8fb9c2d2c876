"""A small WAN topology (bench/_wan.py): two nodes on a LAN fetch from an origin 100 ms / 1 % away.

Real processes in network namespaces: `serve-mirror` in the origin namespace behind a
WAN link (htb cap, delay and loss through NFQUEUE), two `join --seed` nodes in the LAN
namespace. Skipped, with the reason, where the bed cannot run (not root, no NFQUEUE,
tools missing); CI runs as root with scripts/setup's packages.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from swarm.harness import CLI, Proc, processes, publish, same_tree

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import _wan

pytestmark = [pytest.mark.integration, pytest.mark.wan, pytest.mark.timeout(300)]

MiB = 1 << 20


@pytest.fixture
def bed() -> Iterator[_wan.WanBed]:
    why = _wan.unavailable()
    if why:
        pytest.skip(f"WAN test bed unavailable: {why}")
    b = _wan.WanBed(f"t{os.getpid() % 100000}", [_wan.Link(rtt=0.1, loss=0.01, rate=20 * MiB)], max_seconds=600)
    try:
        b.up()
    except _wan.WanUnavailable as exc:
        pytest.skip(f"WAN test bed unavailable: {exc}")
    try:
        yield b
    finally:
        b.down()


def _in(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def test_two_nodes_fetch_over_a_lossy_long_link(tmp_path: Path, bed: _wan.WanBed) -> None:
    pub = publish(tmp_path, size="16MiB", piece="1MiB")
    size = sum(p.stat().st_size for p in pub["model"].rglob("*") if p.is_file())
    lan = bed.lan_ns[0]
    with processes() as procs:
        mirror = Proc(_in(bed.origin_ns[0], [*CLI, "serve-mirror", str(pub["model"]),
                                             "--listen", f"{bed.origin_ip(0)}:8080"]), "mirror", tmp_path)
        procs.append(mirror)
        url = str(mirror.wait_for(lambda ln: ln.get("text", "").startswith("http://"), 30)["text"])
        assert bed.origin_ip(0) in url

        def node(name: str, bootstrap: list[str]) -> Proc:
            argv = [*CLI, "--data-dir", str(tmp_path / name), "join", "--json", "--trust", str(pub["key"]),
                    "--out", str(tmp_path / f"{name}-out"), "--mirror", url, "--seed", str(pub["manifest"])]
            for b in bootstrap:
                argv += ["--bootstrap", b]
            p = Proc(_in(lan, argv), name, tmp_path)
            procs.append(p)
            return p

        egress0 = bed.tx_bytes(0)
        t0 = time.monotonic()
        a = node("a", [])
        addr = a.event("ready", 60)["addrs"][0]
        b = node("b", [addr])
        for p in (a, b):
            p.event("complete", 180)
        took = time.monotonic() - t0
        egress = bed.tx_bytes(0) - egress0
    for name in ("a", "b"):
        assert same_tree(pub["model"], tmp_path / f"{name}-out"), f"{name}: files differ from the model"
    # 16 MiB through a 20 MiB/s, 100 ms / 1 % link: seconds with BBR; generous for a loaded CI machine
    assert took < 150, f"took {took:.1f} s"
    # the two nodes share one copy from the origin (headers and retransmissions on top), never two
    assert egress < 1.5 * size, f"origin sent {egress / size:.2f}x the model"
    print(f"2 nodes, {size / MiB:.0f} MiB over 100 ms / 1 %: {took:.1f} s, origin egress {egress / size:.2f}x")


def test_the_link_delays_and_drops(bed: _wan.WanBed) -> None:
    """The bed is what it says: a TCP handshake takes one RTT, and the delay program drops packets."""
    probe = ("import socket,time; s=socket.socket(); t=time.monotonic(); "
             f"s.connect_ex(('{bed.origin_ip(0)}', 9)); print(time.monotonic()-t)")
    r = subprocess.run(_in(bed.lan_ns[0], [sys.executable, "-c", probe]), capture_output=True, text=True, timeout=30)
    assert 0.1 <= float(r.stdout) < 1.0, r.stdout + r.stderr  # the RST to a closed port comes after one RTT
    rate = _wan.tcp_transfer(bed, seconds=3, cc="cubic")
    bed.down()
    dropped = [int(m) for s in bed.nfq_stats for m in re.findall(r"(\d+) dropped", s)]
    assert dropped and dropped[0] > 0, bed.nfq_stats
    assert rate < 4 * _wan.mathis(0.1, 0.01), f"one cubic flow at {rate / 1e6:.2f} MB/s: is the loss applied?"
