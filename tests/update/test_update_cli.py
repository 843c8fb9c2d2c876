"""`autoglm-node update MANIFEST`, `rollback`, `versions`, `gc`: real processes, a real mirror.

v2 changes 2 of 8 tensors: the update fetches only those pieces (the rest are
copied from v1 in the store), `rollback` switches back fetching nothing (the
mirror counts 0 bytes), and a real `update` process SIGKILLed at random
times never leaves a mixed or empty `current`.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from autoglm.node._versions import VersionSet, resolve_current

from ._models import CLI, Mirror, changed_bytes, cli, keygen, publish, tree_digest, write_version

pytestmark = pytest.mark.integration


def _update(data: Path, manifest: Path, mirror: str, root: Path, *extra: str) -> dict[str, object]:
    p = cli("--data-dir", str(data), "update", str(manifest), "--mirror", mirror, "--versions-dir", str(root),
            "--json", "--standalone", *extra)
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pub")
    key, pub = keygen(tmp)
    out: dict[str, Path] = {"pub": pub}
    for v, changed in ((1, ()), (2, ("layer.2.weight", "layer.5.weight")), (3, ("layer.2.weight", "layer.6.weight"))):
        src = write_version(tmp, v, changed)
        out[f"src{v}"] = src
        out[f"m{v}"] = publish(tmp, src, key, v)
    return out


def test_update_fetches_the_delta_and_rollback_fetches_nothing(tmp_path: Path, published: dict[str, Path]) -> None:
    data, root = tmp_path / "data", tmp_path / "model"
    trust = ("--trust", str(published["pub"]))
    m1 = Mirror(published["src1"])
    r1 = _update(data, published["m1"], m1.url, root, *trust)
    full = m1.stop()
    assert r1["switched"] and r1["previous"] is None
    assert tree_digest(resolve_current(root)) == tree_digest(published["src1"])  # type: ignore[arg-type]

    m2 = Mirror(published["src2"])
    r2 = _update(data, published["m2"], m2.url, root, *trust)
    delta = m2.stop()
    want = changed_bytes(published["m2"], published["m1"])
    assert r2["switched"] and r2["previous"] == r1["current"]
    assert tree_digest(resolve_current(root)) == tree_digest(published["src2"])  # type: ignore[arg-type]
    assert delta == want, (delta, want, full)
    assert delta < full / 3

    # rollback: no network at all; the mirror (serving v1) counts 0 bytes
    m3 = Mirror(published["src1"])
    p = cli("--data-dir", str(data), "rollback", "t/model", "--versions-dir", str(root), "--json")
    assert m3.stop() == 0
    back = json.loads(p.stdout)
    assert back["current"] == r1["current"] and back["previous"] == r2["current"]
    assert tree_digest(resolve_current(root)) == tree_digest(published["src1"])  # type: ignore[arg-type]

    # moving forward again to a kept version fetches nothing either
    m4 = Mirror(published["src2"])
    again = _update(data, published["m2"], m4.url, root, *trust)
    assert m4.stop() == 0
    assert again["switched"] and again["current"] == r2["current"]

    # versions lists both, current first; gc keeps them
    listing = [json.loads(x) for x in cli("--data-dir", str(data), "versions", "t/model", "--versions-dir", str(root),
                                          "--json").stdout.splitlines()]
    assert [x["version"] for x in listing] == [r2["current"], r1["current"]]
    assert listing[0]["current"]
    (root / "versions" / "leftover-0000").mkdir()
    gc = json.loads(cli("--data-dir", str(data), "gc", "--json").stdout)
    assert any("leftover-0000" in a for a in gc["actions"])
    assert {d.name for d in (root / "versions").iterdir()} == {r1["current"], r2["current"]}


def test_keep_prunes_old_versions_and_the_next_update_still_fetches_only_the_delta(
        tmp_path: Path, published: dict[str, Path]) -> None:
    data, root = tmp_path / "data", tmp_path / "model"
    trust = ("--trust", str(published["pub"]))
    names = []
    for v in (1, 2, 3):
        m = Mirror(published[f"src{v}"])
        names.append(_update(data, published[f"m{v}"], m.url, root, "--keep", "1", *trust)["current"])
        sent = m.stop()
        if v == 3:
            # v3 brings back v1's layer.5: still in the store (pruned only after the switch), so copied
            assert sent == changed_bytes(published["m3"], published["m1"], published["m2"])
            assert sent < changed_bytes(published["m3"], published["m2"])
    assert VersionSet(root).history() == [names[2], names[1]]
    assert not (root / "versions" / names[0]).exists()


def test_refused_and_untrusted_versions_never_become_current(tmp_path: Path, published: dict[str, Path]) -> None:
    data, root = tmp_path / "data", tmp_path / "model"
    m1 = Mirror(published["src1"])
    _update(data, published["m1"], m1.url, root, "--trust", str(published["pub"]))
    m1.stop()
    before = resolve_current(root)
    # an untrusted publisher (no --trust, empty trust store): refused before any byte moves
    m2 = Mirror(published["src2"])
    p = cli("--data-dir", str(data), "update", str(published["m2"]), "--mirror", m2.url, "--versions-dir", str(root),
            "--standalone", ok=False)
    assert m2.stop() == 0
    assert p.returncode == 4, p.stderr
    assert resolve_current(root) == before


def test_sigkill_of_update_at_random_times_never_leaves_a_mixed_current(tmp_path: Path, published: dict[str, Path]) -> None:
    data, root = tmp_path / "data", tmp_path / "model"
    trust = ("--trust", str(published["pub"]))
    m1 = Mirror(published["src1"])
    _update(data, published["m1"], m1.url, root, *trust)
    m1.stop()
    v1, v2 = tree_digest(published["src1"]), tree_digest(published["src2"])
    m2 = Mirror(published["src2"])
    rng = random.Random(1414)
    outcomes = set()
    try:
        for _ in range(6):
            p = subprocess.Popen([*CLI, "--data-dir", str(data), "update", str(published["m2"]), "--mirror", m2.url,
                                  "--versions-dir", str(root), "--standalone", "--json", *trust],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.3, 3.0))
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
            cur = resolve_current(root)
            assert cur is not None and cur.is_dir()
            digest = tree_digest(cur)
            assert digest in (v1, v2), f"current {cur} is neither v1 nor v2"
            outcomes.add("v1" if digest == v1 else "v2")
            if digest == v2:  # switched before the kill: go back for the next round
                cli("--data-dir", str(data), "rollback", "t/model", "--versions-dir", str(root))
        # after all that, a clean run finishes the job
        done = _update(data, published["m2"], m2.url, root, *trust)
    finally:
        m2.stop()
    assert tree_digest(resolve_current(root)) == v2  # type: ignore[arg-type]
    assert done["current"] == resolve_current(root).name  # type: ignore[union-attr]
