"""Structured logs without secrets, and SIGHUP/SIGTERM, with real `autoglm-node` processes.

Logs: a real fetch at -vv with an Authorization header, an HF_TOKEN-like token
in the environment and a swarm key; every line of stdout and stderr is
searched for the secrets, and the JSON lines must carry model and source.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from swarm.harness import CLI, Proc, processes, publish, start_mirror, start_node

from autoglm.node._logs import (
    ContextFilter,
    JsonFormatter,
    KeyValueFormatter,
    add_secret,
    log_model,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODEL = "demo/m@1"
BEARER = "s3cr3t-bearer-0123456789abcdef"
HF_TOKEN = "hf_" + "Zq7" * 12
SWARM_KEY = "5a" * 16 + "c3" * 16


@pytest.fixture(scope="module")
def pub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return publish(tmp_path_factory.mktemp("published"), size="2MiB", piece="256KiB")


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for ln in text.splitlines():
        ln = ln.strip()
        if ln.startswith("{"):
            out.append(json.loads(ln))
    return out


def test_a_fetch_at_debug_logs_structured_lines_and_no_secret(tmp_path: Path, pub: dict[str, Path]) -> None:
    env = {**os.environ, "HF_TOKEN": HF_TOKEN}
    keyfile = tmp_path / "swarm.key"
    keyfile.write_text(SWARM_KEY + "\n")
    with processes() as procs:
        mirror = start_mirror(procs, tmp_path, pub["model"])
        res = subprocess.run(
            [*CLI, "-vv", "--log-format", "json", "--data-dir", str(tmp_path / "f"), "fetch", str(pub["manifest"]),
             "--trust", str(pub["key"]), "--mirror", mirror, "--header", f"Authorization: Bearer {BEARER}",
             "--out", str(tmp_path / "f-out"), "--json"],
            capture_output=True, text=True, timeout=120, env=env, check=False)
        assert res.returncode == 0, res.stderr[-3000:]
        node = start_node(procs, tmp_path, "j", pub, mirrors=[mirror],
                          extra=["-v", "--swarm-key", str(keyfile)], env={"HF_TOKEN": HF_TOKEN})
        node.event("complete", 90)
        node.stop()
        join_err = node.err_path.read_text()
    everything = res.stdout + res.stderr + join_err + json.dumps(node.seen)
    for secret in (BEARER, HF_TOKEN, SWARM_KEY):
        assert secret not in everything
    assert len(res.stderr.splitlines()) >= 2  # -vv did log: the search above looked at something
    # --log-format json: every stderr line is one JSON object.
    lines = [json.loads(ln) for ln in res.stderr.splitlines() if ln.strip()]
    assert all({"ts", "level", "logger", "message"} <= set(ln) for ln in lines)
    # join logs key=value (the default) with model and source on the event lines.
    pieces = [ln for ln in join_err.splitlines() if "DEBUG autoglm.node._swarm_node: piece " in ln]
    assert pieces, join_err[-2000:]
    assert all(f"model={MODEL}" in ln and "source=mirror:http://127.0.0.1:" in ln for ln in pieces)


def test_formatters_carry_context_and_scrub_secrets() -> None:
    add_secret("registered-secret-value")
    rec = logging.LogRecord("autoglm.x", logging.INFO, __file__, 1, "got %s from %s with %s", (
        "Authorization: Bearer abcdefghijklmnop", "peer:12D3KooWAbc@deadbeef", "registered-secret-value"), None)
    with log_model(MODEL):
        ContextFilter().filter(rec)
    out = json.loads(JsonFormatter().format(rec))
    assert out["model"] == MODEL
    assert out["source"] == "peer:12D3KooWAbc@deadbeef"
    assert out["peer"] == "12D3KooWAbc"
    assert "abcdefghijklmnop" not in out["message"] and "registered-secret-value" not in out["message"]
    kv = KeyValueFormatter().format(rec)
    assert f"model={MODEL}" in kv and "peer=12D3KooWAbc" in kv and "abcdefghijklmnop" not in kv


def _status(data_dir: Path) -> dict[str, Any]:
    r = subprocess.run([*CLI, "--data-dir", str(data_dir), "status", "--json"], capture_output=True, text=True,
                       timeout=30, check=True)
    return dict(json.loads(r.stdout))


def _until_peered(data_dir: Path, timeout: float = 30) -> dict[str, Any]:
    """The node's status once its bootstrap peer has a session (the join handshake is not in `ready`)."""
    deadline = time.monotonic() + timeout
    while True:
        st = _status(data_dir)
        if st["peers"] and st["dht_size"] >= 1:
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


def test_sighup_reloads_mirrors_from_the_config_file_and_keeps_peers(tmp_path: Path, pub: dict[str, Path]) -> None:
    conf = tmp_path / "config.toml"
    with processes() as procs:
        m1 = start_mirror(procs, tmp_path, pub["model"])
        m2 = start_mirror(procs, tmp_path, pub["model"])
        conf.write_text(f'[mirrors]\nurls = ["{m1}"]\n')
        # A peer that holds nothing: the fetch below must come from a mirror, and shows which.
        peer = start_node(procs, tmp_path, "peer", pub, seed=False)
        # No --trust flag: trust and mirrors both come from the file, which trusts no key yet.
        node = Proc([*CLI, "--data-dir", str(tmp_path / "n"), "join", "--json", "--bootstrap",
                     peer.seen[0]["addrs"][0]], "n", tmp_path, {"AUTOGLM_NODE_CONFIG": str(conf)})
        procs.append(node)
        node.event("ready", 60)
        before = _until_peered(tmp_path / "n")
        conf.write_text(f'[mirrors]\nurls = ["{m2}"]\n[trust]\nkeys = ["{pub["key"]}"]\n')
        node.p.send_signal(signal.SIGHUP)
        reloaded = node.event("reloaded", 30)
        assert reloaded["mirrors"] == [m2] and reloaded["trusted_keys"] == 1
        after = _status(tmp_path / "n")
        assert after["peer_id"] == before["peer_id"]
        assert after["dht_size"] >= before["dht_size"]
        assert {p["peer_id"] for p in after["peers"]} >= {p["peer_id"] for p in before["peers"]}
        # The next fetch names no mirror and no key: the node uses its reloaded ones.
        r = subprocess.run([*CLI, "--data-dir", str(tmp_path / "n"), "fetch", str(pub["manifest"]),
                            "--out", str(tmp_path / "n-out"), "--json"],
                           capture_output=True, text=True, timeout=120, check=False,
                           env={**os.environ, "AUTOGLM_NODE_CONFIG": ""})
        assert r.returncode == 0, r.stderr[-2000:]
        done = [ln for ln in _json_lines(r.stdout) if ln.get("event") in ("done", "result")][-1]
        assert set(done["bytes_by_source"]) == {f"mirror:{m2}"}
        # The peer survived the reload: still connected (no dropped sessions).
        assert node.p.poll() is None
        assert len(_status(tmp_path / "n")["peers"]) >= len(before["peers"])


def test_sigterm_finishes_the_pieces_in_flight_then_exits_0(tmp_path: Path, pub: dict[str, Path]) -> None:
    from autoglm.node._store import Store
    from autoglm.protocol import decode_signed_manifest

    with processes() as procs:
        mirror = start_mirror(procs, tmp_path, pub["model"])
        seed = start_node(procs, tmp_path, "seed", pub, mirrors=[mirror])
        seed.event("complete", 90)
        # 2 MiB in 256 KiB pieces from the peer at 1 MiB/s: pieces are arriving when SIGTERM comes.
        leech = start_node(procs, tmp_path, "leech", pub, bootstrap=[seed.seen[0]["addrs"][0]],
                           extra=["--down-rate", "1MiB"])
        leech.wait_for(lambda ln: ln.get("event") == "progress" and ln["bytes_done"] > 0, 60)
        t0 = time.monotonic()
        leech.p.send_signal(signal.SIGTERM)
        leech.event("stopping", 10)
        leech.event("stopped", 10)
        assert leech.p.wait(timeout=10) == 0
        assert time.monotonic() - t0 < 5 + 3
        # The pieces in flight finished and no other started: the fetch stopped short of its end,
        # and nothing half-received is left in staging (every byte there is a recorded piece).
        assert not any(ln.get("event") == "complete" for ln in leech.seen)
        signed = decode_signed_manifest(pub["manifest"].read_bytes())
        store = Store(tmp_path / "leech")
        try:
            [info] = store.downloads()
            assert 0 < info.pieces_done < info.pieces_total
            dl = store.open_download(signed, info.out_dir)
            assert dl.recover() == [] and dl.partial == {}
            dl.close()
        finally:
            store.close()
        # A fetch whose piece cannot finish in the grace time is stopped at its end; the node still exits 0.
        slow = start_node(procs, tmp_path, "slow", pub, bootstrap=[seed.seen[0]["addrs"][0]],
                          extra=["--down-rate", "32KiB"])
        slow.event("fetch-started", 60)
        t0 = time.monotonic()
        slow.p.send_signal(signal.SIGTERM)
        slow.event("stopped", 15)
        assert slow.p.wait(timeout=10) == 0
        assert 4.5 < time.monotonic() - t0 < 5 + 5
        assert not any(ln.get("event") == "complete" for ln in slow.seen)
