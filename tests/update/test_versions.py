"""The on-disk version set: atomic switch, rollback, kept versions, gc, and crashes at every step.

A crash is a real SIGKILL of a real process: a child applies the first i
steps of the switch (the production step list, node/_versions.plan_switch)
and then kills itself, or a child switching in a loop is killed at random
times. After each, ``current`` must name one complete version.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from autoglm.node._store import Store
from autoglm.node._versions import (
    CURRENT,
    HubPin,
    VersionSet,
    collect_versions,
    forget_in_store,
    gc_versions,
    register_root,
    resolve_current,
)
from autoglm.node.errors import ConfigError
from autoglm.node.hub._cache import snapshot_problem
from autoglm.protocol import FileEntry, Manifest, Piece, SignedManifest, key_id, sign_manifest

FILES = ("config.json", "model-00001.safetensors", "model-00002.safetensors", "tokenizer.json")


def _make_version(root: Path, name: str) -> Path:
    d = root / "versions" / name
    d.mkdir(parents=True)
    for f in FILES:
        (d / f).write_text(f"{name}:{f}\n" * 64)
    return d


def _check_one_version(root: Path) -> str:
    """``current`` resolves to one complete version; every file says that version. Returns it."""
    assert (root / CURRENT).is_symlink(), "current is missing"
    target = resolve_current(root)
    assert target is not None and target.is_dir(), f"current -> {target}, which is not a directory"
    seen = {(target / f).read_text().split(":", 1)[0] for f in FILES}
    assert seen == {target.name}, f"mixed or wrong files in {target}: {seen}"
    return target.name


def test_switch_rollback_keep(tmp_path: Path) -> None:
    vs = VersionSet(tmp_path)
    for v in ("v1", "v2", "v3", "v4"):
        _make_version(tmp_path, v)
    vs.switch("v1", keep=2)
    vs.switch("v2", keep=2)
    vs.switch("v3", keep=2)
    assert vs.history() == ["v3", "v2", "v1"]
    assert _check_one_version(tmp_path) == "v3"
    assert (tmp_path / "versions" / "v4").is_dir()  # never current: not pruned by a switch that does not see it kept
    vs.switch("v4", keep=2)
    assert vs.history() == ["v4", "v3", "v2"]
    assert not (tmp_path / "versions" / "v1").exists()  # fell out of the kept set
    assert vs.rollback(keep=2) == "v3"
    assert _check_one_version(tmp_path) == "v3"
    assert vs.history() == ["v3", "v4", "v2"]
    assert vs.rollback(keep=2) == "v4"  # rollback of a rollback returns
    assert os.readlink(tmp_path / CURRENT) == "versions/v4"  # relative: the root can move


def test_rollback_without_an_earlier_version_is_a_clear_error(tmp_path: Path) -> None:
    vs = VersionSet(tmp_path)
    with pytest.raises(ConfigError, match="no earlier version"):
        vs.rollback(keep=2)
    _make_version(tmp_path, "v1")
    vs.switch("v1", keep=2)
    with pytest.raises(ConfigError, match="no earlier version"):
        vs.rollback(keep=2)


def test_history_is_reconciled_with_current(tmp_path: Path) -> None:
    """A crash after the swap but before history.json: current wins, the old one stays kept."""
    vs = VersionSet(tmp_path)
    _make_version(tmp_path, "v1")
    _make_version(tmp_path, "v2")
    vs.switch("v1", keep=2)
    os.symlink("versions/v2", tmp_path / ".tmp-link")
    os.replace(tmp_path / ".tmp-link", tmp_path / CURRENT)  # the swap alone
    assert vs.history() == ["v2", "v1"]
    assert vs.kept() == {"v1", "v2"}
    (tmp_path / "history.json").write_text("not json")
    assert vs.history() == ["v2"]


def test_gc_removes_only_versions_outside_the_kept_set(tmp_path: Path) -> None:
    data = tmp_path / "data"
    root = tmp_path / "m"
    vs = VersionSet(root)
    for v in ("v1", "v2", "v3", "failed"):
        _make_version(root, v)
    register_root(data, root)
    vs.switch("v1", keep=1)
    vs.switch("v2", keep=1)
    vs.switch("v3", keep=1)  # prunes v1
    (root / ".current.999.tmp").symlink_to("versions/v1")  # a crash leftover
    done = gc_versions(data)
    assert [p.name for p in (root / "versions").iterdir()] and not (root / "versions" / "failed").exists()
    assert {p.name for p in (root / "versions").iterdir()} == {"v3", "v2"}
    assert any("failed" in a for a in done)
    assert not (root / ".current.999.tmp").is_symlink()
    assert _check_one_version(root) == "v3"
    assert gc_versions(data) == []  # nothing more to do: kept versions stay


def _signed(version: str) -> SignedManifest:
    key = Ed25519PrivateKey.generate()
    f = FileEntry("w.bin", 4, bytes(32), (Piece(0, 4, bytes(32)),))
    return sign_manifest(Manifest(name="t/m", version=version, created_at=1, publisher=key_id(
        key.public_key().public_bytes_raw()), files=(f,), max_piece_size=1 << 20), key)


def test_the_store_forgets_a_version_before_it_is_removed(tmp_path: Path) -> None:
    """Prune and gc: the store's downloads into a removed version go first (a node reads the store at start
    to say what it holds); a crash in between leaves only a directory nobody points at."""
    data, root = tmp_path / "data", tmp_path / "m"
    vs = VersionSet(root)
    for v in ("v1", "v2", "v3", "stale"):
        _make_version(root, v)
    register_root(data, root)
    ms = {v: _signed(v) for v in ("v1", "v2", "v3", "stale")}
    store = Store(data)
    for v, m in ms.items():
        store.open_download(m, root / "versions" / v).close()
    store.open_download(ms["v1"], tmp_path / "elsewhere").close()  # v1 is also held outside the root
    store.close()
    seen: list[tuple[str, bool]] = []

    def forget(dirs: list[Path]) -> None:
        seen.extend((d.name, d.is_dir()) for d in dirs)
        forget_in_store(data, dirs)

    vs.switch("v1", keep=0, forget=forget)
    vs.switch("v2", keep=0, forget=forget)
    assert seen == [("v1", True)]  # told while it was still there
    vs.switch("v3", keep=1, forget=forget)
    done, forgotten = collect_versions(data)
    assert forgotten == [ms["stale"].id] and any("stale" in a for a in done)
    store = Store(data)
    try:
        left = {(i.manifest_id, i.out_dir.name) for i in store.downloads()}
    finally:
        store.close()
    assert left == {(ms["v1"].id, "elsewhere"), (ms["v2"].id, "v2"), (ms["v3"].id, "v3")}
    assert forget_in_store(data, [root / "versions" / "v2"]) == [ms["v2"].id]
    assert forget_in_store(tmp_path / "no-store", [root]) == []  # no store: nothing to forget, none created
    assert not (tmp_path / "no-store").exists()


def test_hub_pins_are_kept_per_version(tmp_path: Path) -> None:
    vs = VersionSet(tmp_path)
    for v in ("v1", "v2"):
        _make_version(tmp_path, v)
    pin = HubPin("/c", "org/repo", "main", "a" * 40)
    vs.pin_hub("v1", pin)
    vs.pin_hub("v2", HubPin("/c", "org/repo", "main", "b" * 40))
    assert vs.hub_pin("v1") == pin and vs.hub_pin("v3") is None
    (tmp_path / "hf-cache.json").write_text('{"v1": {"cache": 1}}')  # damaged: no pin, never a crash
    assert vs.hub_pin("v1") is None


def test_snapshot_problem_names_what_is_missing(tmp_path: Path) -> None:
    repo = tmp_path / "models--o--r"
    c = "c" * 40
    assert snapshot_problem(repo, c) is not None
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "e1").write_bytes(b"12345")
    (repo / "snapshots" / c).mkdir(parents=True)
    (repo / "snapshots" / c / "a.bin").symlink_to("../../blobs/e1")
    assert snapshot_problem(repo, c) is None
    (repo / "trees").mkdir()
    (repo / "trees" / f"{c}.json").write_text(json.dumps({"format_version": 1, "files": {
        "a.bin": {"size": 5}, "b.bin": {"size": 1}}}))
    assert "b.bin" in str(snapshot_problem(repo, c))
    (repo / "trees" / f"{c}.json").write_text(json.dumps({"format_version": 1, "files": {"a.bin": {"size": 5}}}))
    assert snapshot_problem(repo, c) is None
    (repo / "blobs" / "e1").unlink()  # a blob deleted under the snapshot
    assert "a.bin" in str(snapshot_problem(repo, c))


def test_gc_skips_a_root_with_an_update_running(tmp_path: Path) -> None:
    data, root = tmp_path / "data", tmp_path / "m"
    vs = VersionSet(root)
    _make_version(root, "v1")
    _make_version(root, "incoming")  # being fetched right now
    vs.switch("v1", keep=1)
    register_root(data, root)
    with vs.locked():
        assert gc_versions(data) == [f"skipped versions of {root.resolve()}: an update is running"]
        with pytest.raises(ConfigError, match="another update"):
            with VersionSet(root).locked():
                pass
    assert (root / "versions" / "incoming").is_dir()


_STEP_CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from autoglm.node._versions import VersionSet, plan_switch
    root, target, keep, upto = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    steps = plan_switch(root, target, VersionSet(root).history(), keep)
    print(len(steps), flush=True)
    for what, action in steps[:upto]:
        action()
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("keep", [0, 1])
def test_sigkill_after_every_step_leaves_one_whole_version(tmp_path: Path, keep: int) -> None:
    n_steps = None
    upto = 0
    while n_steps is None or upto <= n_steps:
        root = tmp_path / f"k{keep}-s{upto}"
        vs = VersionSet(root)
        _make_version(root, "v1")
        _make_version(root, "v2")
        vs.switch("v1", keep=keep)
        p = subprocess.run([sys.executable, "-c", _STEP_CHILD, str(root), "v2", str(keep), str(upto)],
                           capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == -signal.SIGKILL, p.stderr
        n_steps = int(p.stdout.split()[0])
        now = _check_one_version(root)
        assert now == ("v1" if upto < 2 else "v2"), (upto, now)  # step 2 is the rename
        assert VersionSet(root).history()[0] == now
        # What the crash left is finished by the next switch, then tidied by gc, never worse.
        vs.switch("v2", keep=keep)
        assert _check_one_version(root) == "v2"
        register_root(tmp_path / "data", root)
        gc_versions(tmp_path / "data")
        assert _check_one_version(root) == "v2"
        assert not list(root.glob(".current.*.tmp"))
        assert (root / "versions" / "v1").is_dir() == (keep > 0)
        upto += 1
    assert n_steps == 4


_LOOP_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from autoglm.node._versions import VersionSet
    root = Path(sys.argv[1])
    vs = VersionSet(root)
    print("go", flush=True)
    i = 0
    while True:
        vs.switch(f"v{i % 3}", keep=2)
        i += 1
""")


def test_random_sigkill_of_a_switching_process_while_a_reader_reads(tmp_path: Path) -> None:
    """A real process switches v0 -> v1 -> v2 -> ... and is SIGKILLed at random; a reader in
    this process resolves current once per load and must always read one version whole."""
    root = tmp_path / "m"
    for v in ("v0", "v1", "v2"):
        _make_version(root, v)
    VersionSet(root).switch("v0", keep=2)
    stop = threading.Event()
    loads: list[str] = []
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                target = resolve_current(root)
                assert target is not None
                seen = {(target / f).read_text().split(":", 1)[0] for f in FILES}
                if seen != {target.name}:
                    problems.append(f"{target}: {seen}")
                loads.append(target.name)
            except (OSError, AssertionError) as exc:
                problems.append(repr(exc))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    rng = random.Random(14)
    try:
        for _ in range(12):
            p = subprocess.Popen([sys.executable, "-c", _LOOP_CHILD, str(root)], stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None and p.stdout.readline().strip() == "go"
            time.sleep(rng.uniform(0.0, 0.3))
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
            _check_one_version(root)
            assert {d.name for d in (root / "versions").iterdir()} == {"v0", "v1", "v2"}  # keep=2: all kept
    finally:
        stop.set()
        t.join(timeout=10)
    assert not problems, problems[:5]
    assert len(set(loads)) == 3, "the reader never saw the switches"


_REF_LOOP = textwrap.dedent("""
    import sys
    from pathlib import Path
    from autoglm.node.hub._cache import write_ref
    repo = Path(sys.argv[1])
    print("go", flush=True)
    i = 0
    while True:
        write_ref(repo, "main", ("a" if i % 2 else "b") * 40)
        i += 1
""")


def test_hf_cache_ref_is_replaced_whole_under_random_sigkill(tmp_path: Path) -> None:
    """The HF cache layout's switch: refs/main is written to a temp file and renamed, so a reader
    (huggingface_hub reads refs/<rev> to pick the snapshot) sees one whole commit, never a torn one."""
    from autoglm.node.hub._cache import write_ref

    write_ref(tmp_path, "main", "a" * 40)
    stop = threading.Event()
    seen: set[str] = set()

    def reader() -> None:
        while not stop.is_set():
            seen.add((tmp_path / "refs" / "main").read_text())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    rng = random.Random(7)
    try:
        for _ in range(6):
            p = subprocess.Popen([sys.executable, "-c", _REF_LOOP, str(tmp_path)], stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None and p.stdout.readline().strip() == "go"
            time.sleep(rng.uniform(0.0, 0.3))
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
            assert (tmp_path / "refs" / "main").read_text() in ("a" * 40, "b" * 40)
    finally:
        stop.set()
        t.join(timeout=10)
    assert seen == {"a" * 40, "b" * 40}


_REF_KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from autoglm.node.hub import _cache
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    _cache.os.replace = die  # killed with the new ref written to its temp file, before the rename
    _cache.write_ref(Path(sys.argv[1]), "main", "b" * 40)
""")


def test_a_ref_write_killed_before_its_rename_leaves_nothing_under_refs(tmp_path: Path) -> None:
    """huggingface_hub reads every file under refs/ as a ref: the temp file lives beside refs/, not in it."""
    repo = tmp_path / "models--o--r"
    from autoglm.node.hub._cache import write_ref

    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    write_ref(repo, "main", "a" * 40)
    p = subprocess.run([sys.executable, "-c", _REF_KILLED, str(repo)], capture_output=True, timeout=60, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert [f.name for f in (repo / "refs").rglob("*")] == ["main"]
    assert (repo / "refs" / "main").read_text() == "a" * 40
    assert len(list(repo.glob(".main.*.tmp"))) == 1  # what the kill left, outside refs/
    scan = subprocess.run([sys.executable, "-c", "import sys; from huggingface_hub import scan_cache_dir; "
                           "r = scan_cache_dir(sys.argv[1]); print(len(r.warnings), sorted(r.repos)[0].refs)",
                           str(tmp_path)], capture_output=True, text=True, timeout=60, check=True)
    assert scan.stdout.startswith("0 "), scan.stdout
