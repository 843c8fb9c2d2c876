"""A version pruned by `update --keep` is no longer announced: peers hear an empty bitfield, Hello drops it.

Real processes: a node P and a node F joined to it. F takes v1 then v2 with
`update --keep 0` through its running node; v1's directory is removed, and
P's session with F must stop showing F's v1 pieces (before this, F went on
advertising pieces it no longer had until it restarted, and peers asking
for them counted broken promises against it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm.protocol import decode_signed_manifest
from tests.swarm.harness import CLI, Proc, processes

from ._models import Mirror, cli, keygen, node_status, publish, wait_until, write_version

pytestmark = pytest.mark.integration


def _f_pieces_seen_by_p(tmp: Path, f_id: str, mid: str) -> int | None:
    for peer in node_status(tmp, "P")["peers"]:  # type: ignore[attr-defined]
        if peer["peer_id"] == f_id:
            return peer["manifests"].get(mid)  # type: ignore[no-any-return]
    return None


def test_a_pruned_version_is_unannounced(tmp_path: Path) -> None:
    key, pub = keygen(tmp_path)
    srcs = {1: write_version(tmp_path, 1), 2: write_version(tmp_path, 2, ("layer.2.weight",))}
    ms = {v: publish(tmp_path, srcs[v], key, v) for v in srcs}
    ids = {v: decode_signed_manifest(ms[v].read_bytes()) for v in ms}
    v1 = ids[1].id.hex()
    with processes() as procs:
        p = Proc([*CLI, "--data-dir", str(tmp_path / "P"), "join", "--json"], "P", tmp_path)
        procs.append(p)
        p.event("ready", 90)
        boot = p.seen[0]["addrs"][0]
        f = Proc([*CLI, "--data-dir", str(tmp_path / "F"), "join", "--json", "--bootstrap", boot, "--trust", str(pub)],
                 "F", tmp_path)
        procs.append(f)
        f.event("ready", 90)
        f_id = str(node_status(tmp_path, "F")["peer_id"])

        for v in (1, 2):
            m = Mirror(srcs[v])
            try:
                cli("--data-dir", str(tmp_path / "F"), "update", str(ms[v]), "--mirror", m.url, "--keep", "0", "--json")
            finally:
                m.stop()
            if v == 1:
                wait_until(lambda: _f_pieces_seen_by_p(tmp_path, f_id, v1) == ids[1].manifest.piece_count,
                      "P never saw F hold all of v1")

        versions = sorted(d.name for d in (tmp_path / "F" / "models" / "t_model" / "versions").iterdir())
        assert versions == [f"2-{ids[2].id.hex()[:16]}"]  # v1 was pruned (--keep 0)
        # F no longer holds v1 (its Hello would not name it) and told P so
        assert v1 not in node_status(tmp_path, "F")["held"]  # type: ignore[operator]
        wait_until(lambda: _f_pieces_seen_by_p(tmp_path, f_id, v1) in (0, None), "P still sees F's pieces of pruned v1")
        assert _f_pieces_seen_by_p(tmp_path, f_id, ids[2].id.hex()) == ids[2].manifest.piece_count
