"""The peerwire endpoint a node advertises is one it can be reached at, never a wildcard (#11 item 15).

With ``--peerwire 0.0.0.0:P`` the node used to put host ``0.0.0.0`` in every
Hello and in its status. It now names the bound host when that is concrete,
else the libp2p listen host of the same family, else loopback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autoglm.node.swarm.swarm import advertised_host


@pytest.mark.parametrize(
    ("bound", "listen", "expect"),
    [
        ("127.0.0.1", ["/ip4/10.0.0.5/tcp/4001/p2p/X"], "127.0.0.1"),  # concrete: what it binds
        ("10.1.2.3", [], "10.1.2.3"),
        ("0.0.0.0", ["/ip4/10.0.0.5/tcp/4001/p2p/X"], "10.0.0.5"),  # wildcard: the libp2p host
        ("0.0.0.0", ["/ip4/0.0.0.0/tcp/4001", "/ip6/fd00::1/tcp/1", "/ip4/192.168.1.9/tcp/2"], "192.168.1.9"),
        ("0.0.0.0", ["/ip6/fd00::1/tcp/1"], "127.0.0.1"),  # no concrete IPv4 host: loopback, never 0.0.0.0
        ("0.0.0.0", [], "127.0.0.1"),
        ("::", ["/ip4/10.0.0.5/tcp/1", "/ip6/fd00::7/tcp/1"], "fd00::7"),
        ("::", ["/ip6/::/tcp/1"], "::1"),
        ("node.example", [], "node.example"),
    ],
)
def test_advertised_host_table(bound: str, listen: list[str], expect: str) -> None:
    assert advertised_host(bound, listen) == expect


# A real swarm bound to 0.0.0.0, in a network namespace of its own (only lo,
# nothing outside can reach it): the Hello's endpoint and the status.
_NODE = textwrap.dedent(
    """
    import json, sys, trio
    from pathlib import Path
    from autoglm.node._p2p import open_p2p
    from autoglm.node._store import Store
    from autoglm.node.swarm import Swarm, SwarmConfig

    async def main() -> None:
        d = Path(sys.argv[1])
        async with open_p2p(d / "p2p", listen=["/ip4/127.0.0.1/tcp/0"]) as p2p, trio.open_nursery() as n:
            swarm = await n.start(Swarm(p2p, Store(d / "store"), SwarmConfig(peerwire_host="0.0.0.0")).run)
            print(json.dumps({"endpoint": [swarm.endpoint.host, swarm.endpoint.port],
                              "status": swarm.status()["peerwire"]}), flush=True)
            n.cancel_scope.cancel()

    trio.run(main)
    """
)


def test_a_wildcard_peerwire_bind_advertises_a_concrete_host(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -n (a private network namespace) to bind 0.0.0.0 safely")
    out = subprocess.run(
        ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1" "$2"', sys.executable, _NODE, str(tmp_path)],
        capture_output=True, timeout=120, check=True,
    )
    got = json.loads(out.stdout.decode().strip().splitlines()[-1])
    host, port = got["endpoint"]
    assert host == "127.0.0.1" and port > 0, got
    assert got["status"] == f"127.0.0.1:{port}"
