"""`join --follow NAME`: real nodes on 127.0.0.1 follow a signed name through versions.

The publisher's node P holds each version (fetched once from a mirror) and
points the name at it; followers get the record by push (P's session peers)
or by polling, fetch only the changed pieces from P, gate and switch. A
follower offline for two versions jumps straight to the newest; republishing
v1 with a higher seq rolls everyone back without fetching; a staged record
that does not admit a follower leaves it where it is; a record signed by an
untrusted key is never followed. A local `rollback` on a follower holds
across a restart until the name gets a higher sequence number.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from autoglm.node._versions import resolve_current
from autoglm.protocol import decode_signed_manifest
from tests.swarm.harness import CLI, Proc, processes

from ._models import NAME, Mirror, changed_bytes, cli, keygen, publish, tree_digest, write_version

pytestmark = pytest.mark.integration

INTERVAL = 3.0  # --follow-interval: the longest wait between two polls
# The stated bound (docs/operations.md): interval + one DHT lookup (<= 20 s) + the fetch.
# Here the fetch is a few MiB on loopback; the slack covers a loaded 2-core test machine.
BOUND = INTERVAL + 20 + 30


def _node(procs: list[Proc], tmp: Path, name: str, pub: Path, *extra: str) -> Proc:
    p = Proc([*CLI, "-v", "--data-dir", str(tmp / name), "join", "--json", "--trust", str(pub), *extra], name, tmp)
    procs.append(p)
    p.event("ready", 90)
    return p


def _follower(procs: list[Proc], tmp: Path, name: str, pub: Path, boot: str) -> Proc:
    return _node(procs, tmp, name, pub, "--bootstrap", boot, "--follow", NAME, "--follow-interval", str(INTERVAL))


def _current(tmp: Path, node: str) -> Path | None:
    return resolve_current(tmp / node / "models" / "t_model")


def _wait_current(tmp: Path, node: str, want: dict[str, str], proc: Proc, timeout: float = BOUND) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        cur = _current(tmp, node)
        if cur is not None and cur.is_dir() and tree_digest(cur) == want:
            return time.monotonic() - t0
        if proc.p.poll() is not None:
            raise AssertionError(f"{node} exited; stderr:\n{proc.stderr_tail()}")
        time.sleep(0.2)
    raise AssertionError(f"{node} did not switch within {timeout}s (current {_current(tmp, node)}); stderr:\n{proc.stderr_tail()}")


def _hold(tmp: Path, manifest: Path, src: Path) -> None:
    """P fetches the version once from a mirror (then serves it) and points the name at it."""
    m = Mirror(src)
    try:
        cli("--data-dir", str(tmp / "P"), "fetch", str(manifest), "--mirror", m.url, "--out", str(tmp / f"P-{manifest.stem}"))
    finally:
        m.stop()


def _name_publish(tmp: Path, manifest: Path, key: Path, seq: int, *extra: str) -> dict[str, object]:
    p = cli("--data-dir", str(tmp / "P"), "name-publish", str(manifest), "--key", str(key), "--seq", str(seq), "--json", *extra)
    return json.loads(p.stdout)


def test_followers_track_versions_jump_roll_back_and_honour_staging(tmp_path: Path) -> None:
    key, pub = keygen(tmp_path)
    srcs = {1: write_version(tmp_path, 1), 2: write_version(tmp_path, 2, ("layer.2.weight",)),
            3: write_version(tmp_path, 3, ("layer.2.weight", "layer.6.weight"))}
    ms = {v: publish(tmp_path, srcs[v], key, v) for v in srcs}
    digests = {v: tree_digest(srcs[v]) for v in srcs}
    with processes() as procs:
        p = _node(procs, tmp_path, "P", pub)
        boot = p.seen[0]["addrs"][0]
        _hold(tmp_path, ms[1], srcs[1])
        _name_publish(tmp_path, ms[1], key, 1)
        f1 = _follower(procs, tmp_path, "F1", pub, boot)
        f2 = _follower(procs, tmp_path, "F2", pub, boot)
        _wait_current(tmp_path, "F1", digests[1], f1)
        _wait_current(tmp_path, "F2", digests[1], f2)

        # F2 goes offline; v2 and v3 are published; F1 follows each
        assert f2.stop() == 0
        # v2 with one command: name-publish --preheat fetches it on P first; the mirror sends only the delta
        m = Mirror(srcs[2])
        try:
            _name_publish(tmp_path, ms[2], key, 2, "--preheat", str(tmp_path / "P-v2"), "--mirror", m.url)
        finally:
            sent = m.stop()
        assert sent == changed_bytes(ms[2], ms[1])
        _wait_current(tmp_path, "F1", digests[2], f1)
        _hold(tmp_path, ms[3], srcs[3])
        _name_publish(tmp_path, ms[3], key, 3)
        _wait_current(tmp_path, "F1", digests[3], f1)

        # F2 comes back: straight to v3, never fetching v2
        f2 = _follower(procs, tmp_path, "F2", pub, boot)
        _wait_current(tmp_path, "F2", digests[3], f2)
        v2_dir = decode_signed_manifest(ms[2].read_bytes()).id.hex()[:16]
        assert not [d for d in (tmp_path / "F2" / "models" / "t_model" / "versions").iterdir() if v2_dir in d.name]

        # `update NAME` through the running node: already current
        upd = json.loads(cli("--data-dir", str(tmp_path / "F1"), "update", NAME, "--json").stdout.splitlines()[-1])
        assert upd["switched"] is False and tree_digest(Path(upd["root"]) / "current") == digests[3]

        # roll-back by record: v1 again with a higher seq; F2 (which never had v1... it had: kept) switches
        _name_publish(tmp_path, ms[1], key, 4)
        _wait_current(tmp_path, "F1", digests[1], f1)
        _wait_current(tmp_path, "F2", digests[1], f2)

        # a record for the same NAME by an untrusted key (higher seq, v2's files): never followed
        evil_key = tmp_path / "evil.key"
        cli("--data-dir", str(tmp_path / "pubhome"), "keygen", "--out", str(evil_key))
        evil = tmp_path / "evil.agm"
        cli("--data-dir", str(tmp_path / "pubhome"), "publish", str(srcs[2]), "--key", str(evil_key), "--name", NAME,
            "--version", "666", "--out", str(evil), "--max-piece", "1MiB")
        _name_publish(tmp_path, evil, evil_key, 100)

        # a staged record for 1 ppm of followers: both see it and stay on v1 (so neither took the untrusted one)
        staged = _name_publish(tmp_path, ms[3], key, 5, "--rollout", "0.0001")
        assert staged["rollout"] == 1
        for f in (f1, f2):
            deadline = time.monotonic() + BOUND
            while "seq 5 (3) is staged" not in f.stderr_tail(200_000):
                assert time.monotonic() < deadline, f.stderr_tail()
                time.sleep(0.2)
        assert tree_digest(_current(tmp_path, "F1")) == digests[1]  # type: ignore[arg-type]
        assert tree_digest(_current(tmp_path, "F2")) == digests[1]  # type: ignore[arg-type]

        # the same record at 100 % (a new seq) moves them both
        _name_publish(tmp_path, ms[3], key, 6)
        _wait_current(tmp_path, "F1", digests[3], f1)
        _wait_current(tmp_path, "F2", digests[3], f2)

        # a local rollback on a follower holds across a restart until the name gets a higher seq: F1 restarted
        # resolves seq 6 at once and leaves it (had it forgotten handling it, it would switch back to v3)
        cli("--data-dir", str(tmp_path / "F1"), "rollback", NAME)
        assert tree_digest(_current(tmp_path, "F1")) == digests[1]  # type: ignore[arg-type]
        assert f1.stop() == 0
        f1 = _follower(procs, tmp_path, "F1", pub, boot)
        deadline = time.monotonic() + BOUND
        while "seq 6 already handled" not in f1.stderr_tail(200_000):
            assert time.monotonic() < deadline, f1.stderr_tail()
            time.sleep(0.2)
        assert tree_digest(_current(tmp_path, "F1")) == digests[1]  # type: ignore[arg-type]


def test_follow_without_a_trusted_key_is_a_clear_error(tmp_path: Path) -> None:
    p = subprocess.run([*CLI, "--data-dir", str(tmp_path / "n"), "join", "--json", "--follow", NAME],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "needs a trusted publisher key" in p.stderr
