"""A full disk (a small tmpfs mounted by the test): clear error, verified pieces kept, resume after freeing space."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from .conftest import Published, publish
from .faultserver import FaultServer

CLI = [sys.executable, "-m", "autoglm.node.cli"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or r.returncode}); needs root")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True, timeout=30)


async def _cli(*args: str) -> trio.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process([*CLI, *args], capture_stdout=True, capture_stderr=True, check=False)


async def test_disk_full(tmp_path: Path, small_disk: Path) -> None:
    pub: Published = publish(tmp_path, size=4 << 20, piece=64 << 10, seed=b"full")
    srv = FaultServer(pub.root)
    out = small_disk / "model"
    data = tmp_path / "data"
    base = ["--data-dir", str(data), "fetch", str(pub.manifest_path), "--out", str(out), "--trust", str(pub.pub_path)]
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        base += ["--mirror", srv.url]

        # 1. Preflight refuses before the first byte, in one sentence that says what to do.
        p = await _cli(*base)
        assert p.returncode == 7, p.stderr.decode()
        err = " ".join(p.stderr.decode().split())
        assert "not enough free space" in err and "free some space or choose another --out" in err
        assert srv.stats.requests == 0

        # 2. Without the preflight the disk fills mid-fetch: clear error, verified pieces kept.
        p = await _cli(*base, "--no-space-check")
        assert p.returncode == 7, p.stderr.decode()
        assert "disk is full" in " ".join(p.stderr.decode().split())
        p = await _cli("--data-dir", str(data), "ls", "--json")
        row = json.loads(p.stdout)
        assert 0 < row["pieces_done"] < row["pieces_total"]
        served_before = srv.stats.body_bytes

        # 3. Space freed (the tmpfs grows): the same command resumes and completes.
        with trio.fail_after(30):
            await trio.run_process(["mount", "-o", "remount,size=100m", str(small_disk)])
        p = await _cli(*base)
        assert p.returncode == 0, p.stderr.decode()
        nursery.cancel_scope.cancel()
    pub.assert_identical(out)
    total = pub.signed.manifest.total_size
    assert srv.stats.body_bytes - served_before <= total - row["bytes_done"] + 16 * (64 << 10)
