"""A new GGUF version is fetched as its changed pieces: real publish, serve-mirror and fetch processes.

v1 and v2 of a GGUF file (v2: one tensor changed, one metadata key inserted,
so every tensor after the header moves) are published; v1 is fetched from one
`serve-mirror`, then v2 into the same data directory from another. The v2
mirror must have sent exactly the bytes of the v2 pieces whose hashes v1 does
not have: the header piece(s) and the changed tensor.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autoglm.protocol import decode_signed_manifest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "protocol"))
from formats import write_gguf

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "autoglm.node.cli"]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False)
    assert p.returncode == 0, p.stderr
    return p


class Mirror:
    """`autoglm-node serve-mirror DIR` in a process; stop() returns the body bytes it sent."""

    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen([*CLI, "serve-mirror", str(root)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), self.url

    def stop(self) -> int:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        stats = json.loads(out.strip().splitlines()[-1])
        assert stats["event"] == "mirror-stats"
        return int(stats["body_bytes"])


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"blk.{i}.weight": rng.standard_normal((64, 1024 + 32 * i)).astype(np.float16) for i in range(12)}


def test_fetch_of_new_gguf_version_takes_only_changed_pieces(tmp_path: Path) -> None:
    t1 = _tensors(1)
    t2 = dict(t1)
    t2["blk.5.weight"] = (t1["blk.5.weight"] * 1.01).astype(np.float16)
    for v, tensors, meta in [("1", t1, {"general.name": "m"}), ("2", t2, {"general.name": "m", "general.note": "v2" * 100})]:
        (tmp_path / f"v{v}").mkdir()
        write_gguf(tmp_path / f"v{v}" / "model.gguf", tensors, meta)
    key = tmp_path / "pub.key"
    _cli("keygen", "--out", str(key))
    pub = key.with_suffix(".pub")
    if not pub.exists():
        pub = Path(str(key) + ".pub")
    manifests = {}
    for v in "12":
        out = tmp_path / f"v{v}.agm"
        _cli("--data-dir", str(tmp_path / "pubhome"), "publish", str(tmp_path / f"v{v}"), "--key", str(key),
             "--name", "t/gguf", "--version", v, "--out", str(out), "--max-piece", "1MiB")
        manifests[v] = decode_signed_manifest(out.read_bytes()).manifest
    p1 = manifests["1"].file("model.gguf").pieces
    p2 = manifests["2"].file("model.gguf").pieces
    old = {p.hash for p in p1}
    new_bytes = sum(p.length for p in p2 if p.hash not in old)
    size2 = manifests["2"].file("model.gguf").size
    # the plan is tensor-aligned: most of v2 is pieces v1 already has
    assert new_bytes <= t2["blk.5.weight"].nbytes + 64 * 1024
    assert new_bytes < size2 // 5

    data = tmp_path / "data"
    for v in "12":
        mirror = Mirror(tmp_path / f"v{v}")
        try:
            p = _cli("--data-dir", str(data), "fetch", str(tmp_path / f"v{v}.agm"), "--out", str(tmp_path / f"out{v}"),
                     "--trust", str(pub), "--mirror", mirror.url, "--standalone", "--json", "--check-sha256")
        finally:
            sent = mirror.stop()
        assert (tmp_path / f"out{v}" / "model.gguf").read_bytes() == (tmp_path / f"v{v}" / "model.gguf").read_bytes()
        done = json.loads(p.stdout.strip().splitlines()[-1])
        assert done["event"] == "done", done
        if v == "1":
            assert sent == manifests["1"].file("model.gguf").size
        else:
            assert sent == new_bytes, (sent, new_bytes, size2)
