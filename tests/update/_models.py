"""Versions of a small safetensors model, published with real CLI processes, and a counting mirror."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from autoglm.protocol import decode_signed_manifest

CLI = [sys.executable, "-m", "autoglm.node.cli"]
NAME = "t/model"


def cli(*args: str, timeout: float = 180, ok: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def tensors(version: int, changed: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """8 tensors of 512 KiB; ``changed`` ones differ per version, the rest never."""
    out = {}
    for i in range(8):
        name = f"layer.{i}.weight"
        seed = 1000 * version + i if name in changed else i
        out[name] = np.random.default_rng(seed).standard_normal((256, 512)).astype(np.float32)
    return out


def write_version(tmp: Path, version: int, changed: tuple[str, ...] = ()) -> Path:
    d = tmp / f"src-v{version}"
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors(version, changed), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "t", "hidden": 512}))
    return d


def keygen(tmp: Path) -> tuple[Path, Path]:
    key = tmp / "pub.key"
    cli("--data-dir", str(tmp / "pubhome"), "keygen", "--out", str(key))
    return key, Path(str(key) + ".pub")


def publish(tmp: Path, src: Path, key: Path, version: int) -> Path:
    out = tmp / f"v{version}.agm"
    cli("--data-dir", str(tmp / "pubhome"), "publish", str(src), "--key", str(key), "--name", NAME,
        "--version", str(version), "--out", str(out), "--max-piece", "1MiB")
    return out


def changed_bytes(new: Path, *old: Path) -> int:
    """Bytes of the pieces of ``new`` whose hash no ``old`` manifest has (what a delta must fetch)."""
    b = decode_signed_manifest(new.read_bytes()).manifest
    have = {p.hash for m in old for f in decode_signed_manifest(m.read_bytes()).manifest.files for p in f.pieces}
    return sum(p.length for f in b.files for p in f.pieces if p.hash not in have)


def tree_digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and ".autoglm" not in str(p.relative_to(d))}


class Mirror:
    """`autoglm-node serve-mirror DIR`; stop() returns the body bytes it sent."""

    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen([*CLI, "serve-mirror", str(root)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), self.url

    def stop(self) -> int:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        stats = json.loads(out.strip().splitlines()[-1])
        assert stats["event"] == "mirror-stats"
        return int(stats["body_bytes"])


def node_status(tmp: Path, node: str) -> dict[str, object]:
    """``status --json`` of the node whose data dir is ``tmp / node``."""
    return json.loads(cli("--data-dir", str(tmp / node), "status", "--json").stdout)  # type: ignore[no-any-return]


def wait_until(pred: object, what: str, timeout: float = 60) -> None:
    """Poll ``pred`` every 0.3 s; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


async def offline_load(tmp: Path, cache: Path, shard: str) -> tuple[str, bytes]:
    """What huggingface_hub, offline, loads from ``cache``: (the snapshot's commit, ``shard``'s bytes)."""
    import trio

    from tests.hub.conftest import REPO, clean_env, run_py

    offline = clean_env(tmp, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    code = f"""
import json
from huggingface_hub import snapshot_download, try_to_load_from_cache
snap = snapshot_download({REPO!r}, cache_dir={str(cache)!r}, local_files_only=True)
print(json.dumps([snap, try_to_load_from_cache({REPO!r}, {shard!r}, cache_dir={str(cache)!r})]))
"""
    snap, got = json.loads(await run_py(code, offline))
    return Path(snap).name, await trio.Path(got).read_bytes()
