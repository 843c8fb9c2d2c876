"""A fetch killed with SIGKILL at several points, then run again: no corrupted byte, little re-fetched."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .conftest import Published, publish
from .faultserver import FaultServer

MODEL = "model.safetensors"
PIECE = 64 * 1024
CONNS = 4


async def _run_until(args: list[str], kill_after_pieces: int | None, sig: int = signal.SIGKILL) -> int:
    """Run the CLI; send ``sig`` once it reported ``kill_after_pieces`` verified pieces. Returns pieces seen."""
    proc = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen = 0
    buf = b""
    try:
        assert proc.stdout is not None
        async for chunk in proc.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for ln in lines:
                ev = json.loads(ln)
                if ev["event"] == "piece":
                    seen += 1
            if kill_after_pieces is not None and seen >= kill_after_pieces:
                proc.send_signal(sig)
                break
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if kill_after_pieces is None:
        assert proc.returncode == 0
    elif sig == signal.SIGINT:
        assert proc.returncode == 130  # Ctrl-C: clean stop
    else:
        assert proc.returncode == -signal.SIGKILL
    return seen


@pytest.fixture
def big(tmp_path: Path) -> Published:
    return publish(tmp_path, size=4 << 20, piece=PIECE, seed=b"kill")


async def test_sigkill_then_resume(big: Published, tmp_path: Path) -> None:
    srv = FaultServer(big.root)
    # Slow every body down so the kill lands mid-transfer: 8 KiB per 5 ms per connection.
    srv.add("trickle", count=1_000_000, chunk=8 << 10, interval=0.005, path=MODEL)
    args = [sys.executable, "-m", "autoglm.node.cli", "--data-dir", str(tmp_path / "data"), "fetch", str(big.manifest_path),
            "--out", str(tmp_path / "out"), "--trust", str(big.pub_path), "--mirror", "", "--json",
            "--connections", str(CONNS), "--max-connections", str(CONNS)]
    kills = [3, 10, 25]
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        args[args.index("--mirror") + 1] = srv.url
        with trio.fail_after(120):
            for k in kills:
                await _run_until(args, k)
                assert not (tmp_path / "out" / MODEL).exists()
            await _run_until(args, 5, signal.SIGINT)
            srv.faults.clear()
            await _run_until(args, None)
        nursery.cancel_scope.cancel()
    big.assert_identical(tmp_path / "out")
    size = big.signed.manifest.file(MODEL).size
    served = srv.stats.by_path[MODEL]
    # Each kill may waste at most the piece each in-flight request was in the middle of.
    assert served <= size + (len(kills) + 1) * CONNS * PIECE, (served, size)
