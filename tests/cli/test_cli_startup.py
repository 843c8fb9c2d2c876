"""The CLI's cheap paths stay cheap: `--version` and `--help` load no heavy module.

py-libp2p alone costs about 0.9 CPU-s to import on the development VM
(docs/benchmarks.md, "Cold start"); every command that does not run a node must
start without it, and without the other heavy libraries the node loads on demand.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("libp2p", "trio", "wasmtime", "httpx", "numpy", "prometheus_client", "cryptography", "rich",
         "zstandard", "multiaddr", "anyio", "h11")

_PROBE = """
import contextlib, io, json, sys
from autoglm.node.cli._main import main
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
heavy = sorted({m.split('.')[0] for m in sys.modules} & set(json.loads(sys.stdin.read())))
print(json.dumps({"rc": rc, "heavy": heavy, "out": out.getvalue()}))
"""


def _probe(*argv: str) -> dict[str, object]:
    r = subprocess.run([sys.executable, "-c", _PROBE, *argv], input=json.dumps(HEAVY), capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    result: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("argv", [("--version",), ("--help",), ("join", "--help"), ("fetch", "--help"),
                                  ("status", "--help"), ("serve-mirror", "--help")])
def test_cheap_paths_import_no_heavy_module(argv: tuple[str, ...]) -> None:
    result = _probe(*argv)
    assert result["rc"] == 0
    assert result["out"], "the command printed nothing: the probe ran no CLI path"
    assert result["heavy"] == [], f"`autoglm-node {' '.join(argv)}` imported {result['heavy']}"


def test_probe_sees_heavy_imports() -> None:
    # The probe must be able to fail: the node module itself loads libp2p and trio.
    r = subprocess.run([sys.executable, "-c", "import autoglm.node._p2p, sys, json; "
                        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert {"libp2p", "trio"} <= set(json.loads(r.stdout))
