"""`gc` and `rollback` from the command line while `join` runs: what they remove is no longer announced.

Real processes. Node A takes v1, v2, v3 through its running node (`update
--keep 2`), then v4, which the sandbox gate refuses: v4's directory stays,
held and announced by A, until `gc` removes it. After `gc`, a node B that
starts then hears A's Hello without v4 (v1-v3 still there), and the DHT names
A as a provider of v3 but not of v4. Then `rollback --keep 1` prunes v1: B,
in session with A, hears A's empty bitfield for it. A restarted announces
only what is left on disk (its store forgot the removed versions before they
were removed). Before this, A announced removed versions until it restarted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from autoglm.node._p2p import open_p2p
from autoglm.protocol import decode_signed_manifest
from tests.swarm.harness import CLI, Proc, processes

from ._models import Mirror, cli, keygen, node_status, publish, wait_until, write_version

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def _seen(tmp: Path, viewer: str, peer_id: str) -> dict[str, int] | None:
    """The manifests (id -> pieces) ``viewer`` has heard ``peer_id`` hold, None while not in session."""
    for peer in node_status(tmp, viewer)["peers"]:  # type: ignore[attr-defined]
        if peer["peer_id"] == peer_id:
            return peer["manifests"]  # type: ignore[no-any-return]
    return None


def _join(procs: list[Proc], tmp: Path, name: str, pub: Path, *extra: str) -> Proc:
    p = Proc([*CLI, "--data-dir", str(tmp / name), "join", "--json", "--trust", str(pub), *extra], name, tmp)
    procs.append(p)
    p.event("ready", 90)
    return p


async def _providers_once_routed(tmp: Path, boot: str, known: bytes, gone: bytes) -> tuple[list[str], list[str]]:
    """(providers of ``known``, then of ``gone``) as a fresh DHT node sees them, once its lookups reach the network
    (it looks ``known`` up until it finds a provider: a new node's routing table fills in its first seconds)."""
    with trio.fail_after(90):
        async with open_p2p(tmp / "probe", bootstrap=[boot]) as probe:
            for _ in range(60):
                if found := [p.peer_id for p in await probe.find_manifest_providers(known)]:
                    return found, [p.peer_id for p in await probe.find_manifest_providers(gone)]
                await trio.sleep(1)
            raise AssertionError("a fresh DHT node never found a provider of the kept version")


def test_gc_and_rollback_withdraw_what_they_remove_from_a_running_node(tmp_path: Path) -> None:
    key, pub = keygen(tmp_path)
    srcs = {1: write_version(tmp_path, 1), 2: write_version(tmp_path, 2, ("layer.2.weight",)),
            3: write_version(tmp_path, 3, ("layer.2.weight", "layer.5.weight")),
            4: write_version(tmp_path, 4, ("layer.6.weight",))}
    (srcs[4] / "hook.py").write_text("import os\n")  # code: the gate refuses v4
    ms = {v: publish(tmp_path, srcs[v], key, v) for v in srcs}
    signed = {v: decode_signed_manifest(ms[v].read_bytes()) for v in ms}
    ids = {v: s.id.hex() for v, s in signed.items()}
    full = {v: s.manifest.piece_count for v, s in signed.items()}
    a_dir = ("--data-dir", str(tmp_path / "A"))
    with processes() as procs:
        a = _join(procs, tmp_path, "A", pub)
        boot = a.seen[0]["addrs"][0]
        a_id = str(node_status(tmp_path, "A")["peer_id"])
        for v in (1, 2, 3, 4):
            m = Mirror(srcs[v])
            try:
                p = cli(*a_dir, "update", str(ms[v]), "--mirror", m.url, "--keep", "2", "--json", ok=v != 4)
            finally:
                m.stop()
            if v == 4:
                assert p.returncode != 0 and "hook.py" in p.stdout + p.stderr, p.stderr
        held = node_status(tmp_path, "A")["held"]
        assert all(ids[v] in held for v in (1, 2, 3, 4))  # type: ignore[operator]

        # gc removes v4's directory: A withdraws it at once
        gc = json.loads(cli(*a_dir, "gc", "--json").stdout)["actions"]
        assert any(f"no longer announces {ids[4][:16]}" in x for x in gc), gc
        assert not any(d.name.startswith("4-") for d in (tmp_path / "A" / "models" / "t_model" / "versions").iterdir())
        held = node_status(tmp_path, "A")["held"]
        assert ids[4] not in held and all(ids[v] in held for v in (1, 2, 3))  # type: ignore[operator]

        # the DHT names A for v3, not for v4
        for_v3, for_v4 = trio.run(_providers_once_routed, tmp_path, boot, signed[3].id, signed[4].id)
        assert for_v3 == [a_id] and a_id not in for_v4, (for_v3, for_v4)

        # a node starting now: A's Hello names v1-v3, not v4
        _join(procs, tmp_path, "B", pub, "--bootstrap", boot)
        wait_until(lambda: (_seen(tmp_path, "B", a_id) or {}).get(ids[3]) == full[3], "B never heard A hold v3")
        heard = _seen(tmp_path, "B", a_id) or {}
        assert ids[4] not in heard and all(heard.get(ids[v]) == full[v] for v in (1, 2, 3)), heard

        # rollback --keep 1: [v3, v2, v1] -> [v2, v3]; v1 is pruned and B, in session, hears it go
        rb = json.loads(cli(*a_dir, "rollback", "t/model", "--keep", "1", "--json").stdout)
        assert rb["current"].startswith("2-") and rb["withdrawn"] == [ids[1]], rb
        wait_until(lambda: (_seen(tmp_path, "B", a_id) or {}).get(ids[1]) in (0, None), "B still hears A hold v1")
        heard = _seen(tmp_path, "B", a_id) or {}
        assert heard.get(ids[2]) == full[2] and heard.get(ids[3]) == full[3], heard
        a.stop()

        # A restarted announces what is left, nothing removed
        _join(procs, tmp_path, "A", pub)
        held = node_status(tmp_path, "A")["held"]
        assert sorted(held) == sorted([ids[2], ids[3]]), held  # type: ignore[arg-type]
