"""The on-disk version set: atomic switch, rollback, kept versions, gc, and crashes at every step.

A crash is a real SIGKILL of a real process: a child applies the first i
steps of the switch (the production step list, node/_versions.plan_switch)
and then kills itself, or a child switching in a loop is killed at random
times. After each, ``current`` must name one complete version.
"""

from __future__ import annotations

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

from autoglm.node._versions import (
    CURRENT,
    VersionSet,
    gc_versions,
    register_root,
    resolve_current,
)
from autoglm.node.errors import ConfigError

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
