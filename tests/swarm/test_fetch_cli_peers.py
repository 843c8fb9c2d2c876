"""`autoglm-node fetch` with peers: handed to a running node, or an ephemeral node."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .harness import CLI, processes, publish, same_tree, start_mirror, start_node

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def pub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return publish(tmp_path_factory.mktemp("published"))


def _fetch(data_dir: Path, *args: str) -> list[dict[str, Any]]:
    res = subprocess.run([*CLI, "--data-dir", str(data_dir), "fetch", *args, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]


def test_ephemeral_fetch_with_bootstrap_uses_peers_only(tmp_path: Path, pub: dict[str, Path]) -> None:
    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        seed = start_node(procs, tmp_path, "seed", pub, mirrors=[url])
        seed.event("complete", 90)
        lines = _fetch(tmp_path / "eph", str(pub["manifest"]), "--bootstrap", seed.seen[0]["addrs"][0],
                       "--trust", str(pub["key"]), "--out", str(tmp_path / "eph-out"))
    done = lines[-1]
    assert done["event"] == "done"
    assert set(done["bytes_by_source"]) == {f"peer:{seed.seen[0]['peer_id']}"}
    assert same_tree(pub["model"], tmp_path / "eph-out")


def test_fetch_is_handed_to_the_running_node(tmp_path: Path, pub: dict[str, Path]) -> None:
    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        start_node(procs, tmp_path, "node", pub, seed=False)
        lines = _fetch(tmp_path / "node", str(pub["manifest"]), "--mirror", url,
                       "--trust", str(pub["key"]), "--out", str(tmp_path / "via-node"))
        status = subprocess.run([*CLI, "--data-dir", str(tmp_path / "node"), "status", "--json"],
                                capture_output=True, text=True, timeout=30, check=True)
    assert lines[0]["event"] == "start"  # relayed from the node's engine
    assert lines[-1]["event"] == "done"
    models = json.loads(status.stdout)["models"]
    assert any(m["complete"] for m in models.values())  # the node holds it and serves it on
    assert same_tree(pub["model"], tmp_path / "via-node")


def test_fetch_without_any_source_is_a_clear_error(tmp_path: Path, pub: dict[str, Path]) -> None:
    res = subprocess.run([*CLI, "--data-dir", str(tmp_path / "d"), "fetch", str(pub["manifest"]),
                          "--trust", str(pub["key"]), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "--mirror" in res.stderr and "join" in res.stderr
