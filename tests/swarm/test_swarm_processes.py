"""Swarm integration: real `autoglm-node` processes on 127.0.0.1, bounded in time."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    CLI,
    Proc,
    processes,
    publish,
    same_tree,
    start_adversary,
    start_mirror,
    start_node,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def pub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return publish(tmp_path_factory.mktemp("published"))


def _status(tmp: Path, name: str) -> dict[str, Any]:
    out = subprocess.run([*CLI, "--data-dir", str(tmp / name), "status", "--json"], capture_output=True, timeout=30, check=True)
    value: dict[str, Any] = json.loads(out.stdout)
    return value


def _complete(p: Proc, timeout: float = 90) -> dict[str, Any]:
    return p.event("complete", timeout)


def test_mirror_seed_and_five_nodes_all_byte_identical(tmp_path: Path, pub: dict[str, Path]) -> None:
    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        seed = start_node(procs, tmp_path, "seed", pub, mirrors=[url])
        boot = seed.seen[0]["addrs"][0]
        nodes = [start_node(procs, tmp_path, f"n{i}", pub, bootstrap=[boot], mirrors=[url]) for i in range(5)]
        results = [_complete(p) for p in [seed, *nodes]]
        from_peers = sum(v for r in results for k, v in r["bytes_by_source"].items() if k.startswith("peer:"))
        mirror = procs[0]
        mirror.stop()
        stats = mirror.wait_for(lambda ln: ln.get("event") == "mirror-stats", 10)
    for name in ["seed", *(f"n{i}" for i in range(5))]:
        assert same_tree(pub["model"], tmp_path / f"{name}-out"), name
    size = results[0]["bytes_total"]
    assert from_peers > 0
    # Origin egress is reported for the record; the target (about one copy) is the picker's.
    print(f"origin egress {stats['body_bytes'] / size:.2f} copies; from peers {from_peers / size:.2f} copies")


def test_late_joiner_finds_providers_through_the_dht(tmp_path: Path, pub: dict[str, Path]) -> None:
    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        boot = start_node(procs, tmp_path, "boot", pub, seed=False)  # holds nothing: only a DHT entry point
        boot_addr = boot.seen[0]["addrs"][0]
        seed = start_node(procs, tmp_path, "seed", pub, bootstrap=[boot_addr], mirrors=[url])
        _complete(seed)
        late = start_node(procs, tmp_path, "late", pub, bootstrap=[boot_addr])  # no mirror
        res = _complete(late)
    assert set(res["bytes_by_source"]) == {f"peer:{seed.seen[0]['peer_id']}"}
    assert same_tree(pub["model"], tmp_path / "late-out")


def test_a_third_of_the_nodes_killed_mid_transfer_the_rest_finish(tmp_path: Path, pub: dict[str, Path]) -> None:
    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        seed = start_node(procs, tmp_path, "seed", pub, mirrors=[url])
        _complete(seed)
        boot = seed.seen[0]["addrs"][0]
        # Slow downloads so the kills land while pieces are moving between nodes.
        nodes = [start_node(procs, tmp_path, f"n{i}", pub, bootstrap=[boot], extra=["--down-rate", "6MiB"]) for i in range(6)]
        victims, survivors = nodes[:2], nodes[2:]
        for v in victims:
            v.wait_for(lambda ln: ln.get("event") == "progress" and ln["bytes_done"] > 0, 60)
        for v in victims:
            v.kill()
        for p in survivors:
            _complete(p, 120)
    for i in range(2, 6):
        assert same_tree(pub["model"], tmp_path / f"n{i}-out")


def test_corrupting_peer_is_banned_and_nothing_bad_lands_on_disk(tmp_path: Path, pub: dict[str, Path]) -> None:
    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        evil = start_adversary(procs, tmp_path, "evil", pub, "corrupt")  # every piece, every one corrupted
        boot = evil.seen[0]["addrs"][0]
        honest = start_node(procs, tmp_path, "honest", pub, bootstrap=[boot], mirrors=[url])
        _complete(honest)
        # Peers only, and slow enough that both peers are in use before it is done.
        victim = start_node(procs, tmp_path, "victim", pub, bootstrap=[boot], extra=["--down-rate", "4MiB"])
        res = _complete(victim)
        st = _status(tmp_path, "victim")
    evil_id = evil.seen[0]["peer_id"]
    assert [b[0] for b in st["banned"]] == [evil_id]
    assert any(ln.get("event") == "bad-piece" and evil_id in ln["source_id"] for ln in victim.seen)
    assert [ln["peer_id"] for ln in victim.seen if ln.get("event") == "banned"] == [evil_id]
    assert f"peer:{evil_id}" not in res["bytes_by_source"]
    assert same_tree(pub["model"], tmp_path / "victim-out")


def test_peer_lying_about_its_bitfield_does_not_stall_anyone(tmp_path: Path, pub: dict[str, Path]) -> None:
    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        seed = start_node(procs, tmp_path, "seed", pub, mirrors=[url])
        _complete(seed)
        boot = seed.seen[0]["addrs"][0]
        # The liar claims every piece from the start and has none of them.
        liar = start_adversary(procs, tmp_path, "liar", pub, "lie", bootstrap=[boot])
        # Slow enough that the liar has unchoked it long before it is done.
        victim = start_node(procs, tmp_path, "victim", pub, bootstrap=[boot], extra=["--down-rate", "4MiB"])
        res = _complete(victim, 60)
        st = _status(tmp_path, "victim")
    assert same_tree(pub["model"], tmp_path / "victim-out")
    assert st["lost_pieces"] > 0
    # Refused three pieces it advertised: a lie told repeatedly, banned for a while.
    liar_id = liar.seen[0]["peer_id"]
    assert [ln["peer_id"] for ln in victim.seen if ln.get("event") == "banned"] == [liar_id]
    assert [b[0] for b in st["banned"]] == [liar_id]
    liar_bytes = res["bytes_by_source"].get(f"peer:{liar.seen[0]['peer_id']}", 0)
    assert liar_bytes < res["bytes_total"] // 4
    assert res["seconds"] < 30  # 24 MiB at 4 MiB/s is 6 s: the lies cost little
    print(f"victim took {res['seconds']} s; the liar could not serve {st['lost_pieces']} pieces it advertised")


def test_fetch_through_a_running_nodes_control_api_then_sigterm(tmp_path: Path, pub: dict[str, Path]) -> None:
    from autoglm.node._control_client import request

    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        node = start_node(procs, tmp_path, "node", pub, seed=False)
        req = {"op": "fetch", "manifest": str(pub["manifest"]), "out": str(tmp_path / "via-api"),
               "mirrors": [url], "trust": [str(pub["key"])]}
        events = list(request(tmp_path / "node", req, timeout=60))
        assert events[-1]["event"] == "result", events[-1]
        st = _status(tmp_path, "node")
        assert st["models"][events[-1]["manifest_id"]]["complete"]
        assert node.stop() == 0  # SIGTERM: clean shutdown through cancel scopes
        assert node.event("stopped", 10)
        assert not (tmp_path / "node" / "control.sock").exists()
    assert same_tree(pub["model"], tmp_path / "via-api")


def test_private_swarm_sealed_transfers(tmp_path: Path, pub: dict[str, Path]) -> None:
    key = tmp_path / "swarm.key"
    key.write_text("ab" * 32 + "\n")
    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        seed = start_node(procs, tmp_path, "seed", pub, mirrors=[url], extra=["--swarm-key", str(key)])
        _complete(seed)
        node = start_node(procs, tmp_path, "node", pub, bootstrap=[seed.seen[0]["addrs"][0]],
                          extra=["--swarm-key", str(key)])
        res = _complete(node)
    assert set(res["bytes_by_source"]) == {f"peer:{seed.seen[0]['peer_id']}"}
    assert same_tree(pub["model"], tmp_path / "node-out")


def test_restarted_node_keeps_its_identity_and_serves_what_it_verified(tmp_path: Path, pub: dict[str, Path]) -> None:
    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        seed = start_node(procs, tmp_path, "seed", pub, mirrors=[url])
        _complete(seed)
        assert seed.stop() == 0
        again = start_node(procs, tmp_path, "seed", pub, seed=False)  # no --seed, no mirror
        assert again.seen[0]["peer_id"] == seed.seen[0]["peer_id"]
        node = start_node(procs, tmp_path, "node", pub, bootstrap=[again.seen[0]["addrs"][0]])
        res = _complete(node)
    assert set(res["bytes_by_source"]) == {f"peer:{seed.seen[0]['peer_id']}"}
    assert same_tree(pub["model"], tmp_path / "node-out")


def test_fetch_by_name_resolves_a_signed_record_and_gets_the_manifest_from_peers(
    tmp_path: Path, pub: dict[str, Path]
) -> None:
    from autoglm.node._control_client import request

    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        seed = start_node(procs, tmp_path, "seed", pub, mirrors=[url])
        _complete(seed)
        out = subprocess.run([*CLI, "--data-dir", str(tmp_path / "seed"), "name-publish",
                              str(pub["manifest"]), "--key", str(pub["key"]).removesuffix(".pub"), "--json"],
                             capture_output=True, timeout=60, check=True)
        rec = json.loads(out.stdout)
        node = start_node(procs, tmp_path, "node", pub, seed=False, bootstrap=[seed.seen[0]["addrs"][0]])
        req = {"op": "fetch", "name": "demo/m", "out": str(tmp_path / "by-name"), "trust": [str(pub["key"])]}
        events = list(request(tmp_path / "node", req, timeout=90))
        assert node.p.poll() is None
    assert events[-1]["event"] == "result", events[-1]
    assert events[-1]["manifest_id"] == rec["manifest_id"]
    assert same_tree(pub["model"], tmp_path / "by-name")


async def test_ephemeral_node_fetches_from_peers(tmp_path: Path, pub: dict[str, Path]) -> None:
    import trio

    from autoglm.node._keys import load_trust_policy
    from autoglm.node._plan import FetchPlan
    from autoglm.node._swarm_node import JoinConfig, fetch_with_peers

    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        seed = start_node(procs, tmp_path, "seed", pub, mirrors=[url])
        _complete(seed)
        trust = load_trust_policy(None, [pub["key"]])
        with trio.fail_after(60):
            res = await fetch_with_peers(JoinConfig(tmp_path / "eph", bootstrap=(seed.seen[0]["addrs"][0],)),
                                         FetchPlan(str(pub["manifest"]), tmp_path / "eph-out", trust))
    assert set(res.bytes_by_source) == {f"peer:{seed.seen[0]['peer_id']}"}
    assert same_tree(pub["model"], tmp_path / "eph-out")


def test_peer_claiming_everything_but_never_unchoking_does_not_block_the_mirror(
    tmp_path: Path, pub: dict[str, Path]
) -> None:
    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        liar = start_adversary(procs, tmp_path, "liar", pub, "lie", extra=["--upload-slots", "0"])
        victim = start_node(procs, tmp_path, "victim", pub, bootstrap=[liar.seen[0]["addrs"][0]], mirrors=[url])
        res = _complete(victim, 60)
    assert set(res["bytes_by_source"]) == {f"mirror:{url}"}
    assert same_tree(pub["model"], tmp_path / "victim-out")


async def test_whole_files_are_announced_by_sha256_in_the_dht(tmp_path: Path, pub: dict[str, Path]) -> None:
    import trio

    from autoglm.node._manifests import load_signed_manifest
    from autoglm.node._p2p import open_p2p

    files = load_signed_manifest(pub["manifest"]).manifest.files
    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        boot = start_node(procs, tmp_path, "boot", pub, seed=False)  # a DHT peer to announce to
        boot_addr = boot.seen[0]["addrs"][0]
        seed = start_node(procs, tmp_path, "seed", pub, mirrors=[url], bootstrap=[boot_addr])
        _complete(seed)
        seed_id = seed.seen[0]["peer_id"]
        for f in files:  # announced once each file is whole, never per piece
            seed.wait_for(lambda ln, sha=f.sha256.hex(): ln.get("event") == "announced" and ln["key"] == sha, 60)
        async with open_p2p(tmp_path / "probe", bootstrap=[boot_addr]) as probe:
            with trio.fail_after(60):
                for f in files:
                    assert [p.peer_id for p in await probe.find_file_providers(f.sha256)] == [seed_id]


def test_an_identical_file_under_another_manifest_comes_from_its_holder(tmp_path: Path, pub: dict[str, Path]) -> None:
    """A peer holding the same file under another manifest (another name, version, piece plan) serves it; no mirror."""
    other = tmp_path / "other.agm"
    subprocess.run([*CLI, "--data-dir", str(tmp_path / "pub2"), "publish", str(pub["model"]),
                    "--key", str(pub["key"]).removesuffix(".pub"), "--name", "demo/renamed", "--version", "2",
                    "--out", str(other), "--max-piece", "1MiB"], check=True, capture_output=True, timeout=120)
    pub2 = {**pub, "manifest": other}
    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        seed = start_node(procs, tmp_path, "seed", pub, mirrors=[url])  # holds demo/m 1 only
        _complete(seed)
        node = start_node(procs, tmp_path, "node", pub2, bootstrap=[seed.seen[0]["addrs"][0]])  # no mirror
        res = _complete(node)
    sources = set(res["bytes_by_source"])
    assert sources and all(s.startswith(f"peer:{seed.seen[0]['peer_id']}@") for s in sources), sources
    assert same_tree(pub["model"], tmp_path / "node-out")
