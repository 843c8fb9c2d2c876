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


# What a fetch handed to a running node must not load: it only relays the node's events.
_HEAVY = ("trio", "rich", "msgpack", "cryptography", "blake3", "libp2p", "autoglm.node._engine", "autoglm.node._store")


def test_fetch_is_handed_to_the_running_node(tmp_path: Path, pub: dict[str, Path]) -> None:
    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        start_node(procs, tmp_path, "node", pub, seed=False)
        # -X importtime lists every module the process imported (on stderr).
        res = subprocess.run([CLI[0], "-X", "importtime", *CLI[1:], "--data-dir", str(tmp_path / "node"), "fetch",
                              str(pub["manifest"]), "--mirror", url, "--trust", str(pub["key"]),
                              "--out", str(tmp_path / "via-node"), "--json"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        lines = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
        status = subprocess.run([*CLI, "--data-dir", str(tmp_path / "node"), "status", "--json"],
                                capture_output=True, text=True, timeout=30, check=True)
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")}
    assert "autoglm.node._control_client" in imported
    assert not [m for m in imported if m.split(".")[0] in _HEAVY or m in _HEAVY]
    assert lines[0]["event"] == "start"  # relayed from the node's engine
    assert lines[-1]["event"] == "done"
    assert lines[-1]["bytes_total"] == sum(f.stat().st_size for f in pub["model"].rglob("*") if f.is_file())
    models = json.loads(status.stdout)["models"]
    assert any(m["complete"] for m in models.values())  # the node holds it and serves it on
    assert same_tree(pub["model"], tmp_path / "via-node")


def test_a_handed_over_fetch_fails_with_the_nodes_error_and_exit_code(tmp_path: Path, pub: dict[str, Path]) -> None:
    """The node checks trust; its refusal reaches the user as the same error class and exit code (4)."""
    subprocess.run([*CLI, "--data-dir", str(tmp_path / "k"), "keygen", "--out", str(tmp_path / "other")],
                   check=True, capture_output=True, timeout=60)  # a key that did not sign the manifest
    with processes() as procs:
        start_node(procs, tmp_path, "node", pub, seed=False)
        res = subprocess.run([*CLI, "--data-dir", str(tmp_path / "node"), "fetch", str(pub["manifest"]),
                              "--trust", str(tmp_path / "other.pub"), "--out", str(tmp_path / "o"), "--json"],
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 4, res.stdout[-2000:] + res.stderr[-2000:]
    err = json.loads(res.stdout.splitlines()[-1])
    assert err["event"] == "error" and err["error"] == "TrustError"
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_fetch_without_any_source_is_a_clear_error(tmp_path: Path, pub: dict[str, Path]) -> None:
    res = subprocess.run([*CLI, "--data-dir", str(tmp_path / "d"), "fetch", str(pub["manifest"]),
                          "--trust", str(pub["key"]), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "--mirror" in res.stderr and "join" in res.stderr
