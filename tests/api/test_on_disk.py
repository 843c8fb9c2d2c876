"""What is on disk is what the manifest says: real CLI processes against a real mirror.

A finished file that changes is noticed (``ls``) and repaired by the next
``fetch`` (by its stamp; by a full re-hash with ``--check-sha256``); failed
starts leave nothing behind; ``gc`` cleans what ``ls`` lists.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from autoglm.node import fetch as api_fetch
from autoglm.node._store import Store
from autoglm.protocol import decode_signed_manifest

from .conftest import Served, cli

FILES = ("config.json", "model.safetensors", "tokenizer.json")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "AUTOGLM_NODE_HOME"}
    e["AUTOGLM_DATA_DIR"] = str(tmp_path / "data")
    return e


def fetch(served: Served, out: Path, env: dict[str, str], *extra: str, mirror: str | None = None) -> tuple[int, dict[str, object]]:
    r = cli("fetch", served.work / "tiny" / "tiny.agm", "--mirror", mirror or served.url, "--out", out,
            "--trust", served.pub, "--standalone", "--json", *extra, env=env)
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    done = next((ln for ln in lines if ln.get("event") == "done"), {})
    return r.returncode, done


def fetched(done: dict[str, object]) -> int:
    by = done.get("bytes_by_source")
    assert isinstance(by, dict), done
    return sum(by.values())


def ls(env: dict[str, str]) -> list[dict[str, object]]:
    r = cli("ls", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return [json.loads(ln) for ln in r.stdout.splitlines()]


def flip(path: Path, at: int, keep_mtime: bool = False) -> None:
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def same_as_published(served: Served, out: Path) -> bool:
    return all((out / n).read_bytes() == (served.work / "tiny" / n).read_bytes() for n in FILES)


def test_a_flipped_byte_is_seen_by_ls_and_repaired_by_the_next_fetch(served: Served, tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "out"
    assert fetch(served, out, env)[0] == 0
    assert ls(env)[0]["complete"] is True
    flip(out / "model.safetensors", 700_000)
    [row] = ls(env)
    assert row["complete"] is False and "model.safetensors was changed" in str(row["problem"])
    rc, done = fetch(served, out, env)
    assert rc == 0
    # one piece (256 KiB at most) came again, not the whole model
    assert 0 < fetched(done) <= 256 << 10
    assert same_as_published(served, out)
    assert ls(env)[0]["complete"] is True
    assert fetched(fetch(served, out, env)[1]) == 0  # whole again: nothing more to do


def test_check_sha256_rehashes_even_when_size_and_mtime_were_restored(served: Served, tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "out"
    assert fetch(served, out, env)[0] == 0
    flip(out / "model.safetensors", 100, keep_mtime=True)
    # Same size, mtime and inode: the cheap check takes the stamp's word...
    assert fetched(fetch(served, out, env)[1]) == 0
    # ...the full check does not.
    rc, done = fetch(served, out, env, "--check-sha256")
    assert rc == 0 and fetched(done) > 0
    assert same_as_published(served, out)


def test_a_replaced_file_with_the_same_bytes_costs_nothing_to_refetch(served: Served, tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "out"
    assert fetch(served, out, env)[0] == 0
    shutil.copy(served.work / "tiny" / "model.safetensors", tmp_path / "copy")
    os.replace(tmp_path / "copy", out / "model.safetensors")  # new inode and mtime: re-hashed, all good
    assert fetched(fetch(served, out, env)[1]) == 0
    assert ls(env)[0]["complete"] is True


def test_deleted_file_and_deleted_folder_are_not_complete(served: Served, tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "out"
    assert fetch(served, out, env)[0] == 0
    (out / "config.json").unlink()
    [row] = ls(env)
    assert row["complete"] is False and "config.json was deleted" in str(row["problem"])
    rc, done = fetch(served, out, env)
    assert rc == 0 and fetched(done) == (served.work / "tiny" / "config.json").stat().st_size
    shutil.rmtree(out)
    assert ls(env)[0]["complete"] is False
    r = cli("gc", "--json", env=env)
    assert any("forgot" in a for a in json.loads(r.stdout)["actions"])
    assert ls(env) == []


def test_failed_starts_leave_nothing_behind(served: Served, tmp_path: Path, env: dict[str, str]) -> None:
    kept = tmp_path / "existing"
    kept.mkdir()
    for out in (tmp_path / "f1", tmp_path / "f2", tmp_path / "nested" / "f3", kept):
        rc, _ = fetch(served, out, env, mirror=served.url + "missing/")
        assert rc != 0
    assert ls(env) == []
    assert not (tmp_path / "f1").exists() and not (tmp_path / "f2").exists() and not (tmp_path / "nested" / "f3").exists()
    assert kept.is_dir() and list(kept.iterdir()) == []  # the user's own directory stays


def test_gc_cleans_every_ghost_it_lists(served: Served, tmp_path: Path, env: dict[str, str]) -> None:
    """Rows an older version left after failed starts: staging with a lock file, no pieces."""
    signed = decode_signed_manifest((served.work / "tiny" / "tiny.agm").read_bytes())
    store = Store(Path(env["AUTOGLM_DATA_DIR"]))
    for i in range(3):
        d = store.open_download(signed, tmp_path / f"ghost{i}")
        d.lock()
        d.close()
    store.close()
    assert [row["bytes_done"] for row in ls(env)] == [0, 0, 0]
    r = cli("gc", "--json", env=env)
    actions = json.loads(r.stdout)["actions"]
    assert sum("failed start" in a for a in actions) == 3, actions
    assert ls(env) == []
    assert not any((tmp_path / f"ghost{i}").exists() for i in range(3))


def test_gc_incomplete_removes_the_finished_files_it_put_there(served: Served, tmp_path: Path, env: dict[str, str]) -> None:
    # The small files first (a subset), then the whole model from a mirror that has none of it.
    out = tmp_path / "out"
    api_fetch(served.manifest_url, out=out, trust=served.pub, data_dir=env["AUTOGLM_DATA_DIR"], files=["config.json", "tokenizer.json"])
    rc, _ = fetch(served, out, env, mirror=served.url + "missing/")
    assert rc != 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    [row] = ls(env)
    assert row["complete"] is False and 0 < int(str(row["bytes_done"])) < int(str(row["bytes_total"]))
    (out / "notes.txt").write_text("mine")  # not the store's: gc leaves it
    r = cli("gc", "--json", env=env)
    assert json.loads(r.stdout)["actions"] == [] and (out / "config.json").exists()  # has data: kept without --incomplete
    r = cli("gc", "--incomplete", "--json", env=env)
    [action] = json.loads(r.stdout)["actions"]
    assert "removed 2 finished file(s)" in action
    assert ls(env) == []
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


