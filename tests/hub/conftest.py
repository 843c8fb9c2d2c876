"""Fixtures for hub tests: a real Hub-shaped server (tests/hub/hubserver.py) with a CDN on another host name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import trio
from safetensors.numpy import save

from tests.fetch.faultserver import FaultServer

from .hubserver import HubServer

REPO = "acme/tiny-model"


def tensors(seed: int, n: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer{i}.weight": rng.standard_normal((64, 256)).astype(np.float32) for i in range(n)}


def model_files(seed: int = 1, big: int = 0) -> dict[str, bytes]:
    """A small sharded safetensors model with the usual small files; ``big`` adds a shard of that many bytes."""
    s1, s2 = tensors(seed), tensors(seed + 100)
    index = {"metadata": {"total_size": 0}, "weight_map": {**{k: "model-00001-of-00002.safetensors" for k in s1},
                                                            **{k: "model-00002-of-00002.safetensors" for k in s2}}}
    s2 = {f"b.{k}": v for k, v in s2.items()}
    files = {
        "config.json": json.dumps({"model_type": "tiny", "hidden_size": 256, "seed": seed}).encode(),
        "tokenizer.json": json.dumps({"vocab": {f"t{i}": i for i in range(500)}}).encode(),
        "README.md": b"# tiny model\n",
        "LICENSE": b"# tiny model\n",  # same bytes as README.md: one blob in the cache
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": save(s1),
        "model-00002-of-00002.safetensors": save(s2),
        "sub/dir/notes.txt": b"nested\n" * 10,
    }
    if big:
        rng = np.random.default_rng(seed + 7)
        arr = rng.integers(0, 255, size=big // 4, dtype=np.int32)
        files["big.safetensors"] = save({"w": arr})
    return files


@dataclass
class Hub:
    server: HubServer
    cdn: FaultServer
    root: Path
    commit: str
    files: dict[str, bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    root = tmp_path / "hubroot"
    cdn = FaultServer(root)
    server = HubServer(root, cdn=cdn)
    files = model_files()
    commit = server.add_commit(REPO, files)
    async with trio.open_nursery() as nursery:
        await nursery.start(cdn.serve)
        await nursery.start(server.serve)
        yield Hub(server, cdn, root, commit, files)
        nursery.cancel_scope.cancel()


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """An environment with no stored token, no proxy and the given HF_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and "proxy" not in k.lower()}
    env["HF_HOME"] = str(tmp / "hf-home")
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env["HF_HUB_DISABLE_XET"] = "1"
    env.update(extra)
    return env


async def run_cli(args: list[str], env: dict[str, str], *, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "autoglm.node.cli", *args]
    res = await trio.run_process(cmd, env=env, capture_stdout=True, capture_stderr=True, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} exited {res.returncode}:\n{res.stdout.decode()}\n{res.stderr.decode()}")
    return res


async def run_py(code: str, env: dict[str, str]) -> str:
    """Run Python in a fresh process (huggingface_hub reads HF_* at import); returns stdout."""
    res = await trio.run_process([sys.executable, "-c", code], env=env, capture_stdout=True, capture_stderr=True, check=False)
    if res.returncode != 0:
        raise AssertionError(f"python exited {res.returncode}:\n{res.stdout.decode()}\n{res.stderr.decode()}")
    return res.stdout.decode()


def tree(root: Path) -> dict[str, str]:
    """A folder as {relative path: 'link -> target' | 'file <size>' | 'dir'}; trees/ JSON by content."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link -> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        elif rel.startswith("trees/"):
            out[rel] = "json " + json.dumps(json.loads(p.read_text()), sort_keys=True)
        else:
            out[rel] = f"file {p.stat().st_size}"
    return out
