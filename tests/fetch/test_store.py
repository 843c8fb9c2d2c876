"""The store's kill-safety rules, exercised directly (no network)."""

from __future__ import annotations

from pathlib import Path

import blake3
import pytest

from autoglm.node._store import Store

from .conftest import Published


def _fill(dl, indices) -> None:  # type: ignore[no-untyped-def]
    src = {}
    for f in dl.manifest.files:
        src[f.path] = (dl._root / f.path).read_bytes()
    for i in indices:
        p = dl.pieces[i]
        path = dl.manifest.files[dl.file_of[i]].path
        dl.write(i, 0, src[path][p.offset : p.end])


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "data")
    yield s  # type: ignore[misc]
    s.close()


def _open(store: Store, pub: Published, out: Path):  # type: ignore[no-untyped-def]
    dl = store.open_download(pub.signed, out)
    dl._root = pub.root
    return dl


def test_only_committed_pieces_count_after_a_crash(store: Store, published: Published, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dl = _open(store, published, out)
    _fill(dl, [0, 1, 2, 3])
    dl.commit([0, 1])
    _fill(dl, [5])  # written, never committed: the process "dies" here
    dl.close()
    again = Store(tmp_path / "data")
    dl2 = _open(again, published, out)
    assert dl2.done == {0, 1}
    # Recovery re-hashes staged data that was never recorded: 2, 3, 5 are intact.
    assert sorted(dl2.recover()) == [2, 3, 5]
    again.close()


def test_recover_rejects_torn_pieces(store: Store, published: Published, tmp_path: Path) -> None:
    dl = _open(store, published, tmp_path / "out")
    _fill(dl, [2])
    p = dl.pieces[2]
    path = dl.manifest.files[dl.file_of[2]].path
    half = (published.root / path).read_bytes()[p.offset : p.offset + p.length // 2]
    dl.write(3, 0, half)  # a piece cut short by the kill
    assert dl.recover() == [2]


def test_completion_renames_and_locates_pieces(store: Store, published: Published, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dl = _open(store, published, out)
    everything = dl.missing()
    _fill(dl, everything)
    dl.commit(everything)
    assert dl.is_complete()
    published.assert_identical(out)
    mid = published.signed.id
    assert store.verified_pieces(mid) == set(everything)
    bf = store.bitfield(mid)
    assert bf[0] == 0xFF and len(bf) == (len(everything) + 7) // 8
    loc = store.piece_location(mid, 0)
    assert loc.path == out / dl.manifest.files[dl.file_of[0]].path
    with open(loc.path, "rb") as fh:
        fh.seek(loc.offset)
        assert blake3.blake3(fh.read(loc.length)).digest() == loc.hash == dl.pieces[0].hash
    # A piece edited on disk after this is refused by the peerwire server:
    # tests/swarm/test_peerwire_tcp.py::test_rotted_piece_on_disk.


def test_killed_between_rename_and_record(store: Store, published: Published, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dl = _open(store, published, out)
    everything = dl.missing()
    _fill(dl, everything)
    dl.commit(everything)
    # Forget the "file complete" rows, as if the process died right after os.replace.
    store.db.query("DELETE FROM files")
    dl2 = _open(store, published, out)
    assert dl2.is_complete()  # the moved files were re-verified and adopted
    assert dl2.missing() == []


def test_deleted_output_file_is_fetched_again(store: Store, published: Published, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dl = _open(store, published, out)
    everything = dl.missing()
    _fill(dl, everything)
    dl.commit(everything)
    first = dl.manifest.files[0]
    (out / first.path).unlink()
    dl2 = _open(store, published, out)
    assert len(dl2.missing()) == len(first.pieces)


def test_find_by_hash_across_downloads(store: Store, published: Published, tmp_path: Path) -> None:
    dl = _open(store, published, tmp_path / "a")
    _fill(dl, [0])
    dl.commit([0])
    other = _open(store, published, tmp_path / "b")
    loc = store.find_by_hash(dl.pieces[0].hash, exclude_download=other.id)
    assert loc is not None and loc.length == dl.pieces[0].length
    assert store.find_by_hash(b"\x00" * 32) is None


def test_gc_forgets_vanished_downloads(store: Store, published: Published, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "out"
    dl = _open(store, published, out)
    _fill(dl, [0])
    dl.commit([0])
    dl.close()
    shutil.rmtree(out)
    actions = store.gc()
    assert any("forgot" in a for a in actions)
    assert store.downloads() == []


def test_second_writer_of_the_same_download_is_refused(store: Store, published: Published, tmp_path: Path) -> None:
    from autoglm.node.errors import StorageError

    dl = _open(store, published, tmp_path / "out")
    dl.lock()
    other = _open(store, published, tmp_path / "out")
    with pytest.raises(StorageError, match="another fetch"):
        other.lock()
    dl.close()
    other.lock()  # released with the first one
    other.close()


def test_gc_leaves_a_running_fetch_alone(store: Store, published: Published, tmp_path: Path) -> None:
    dl = _open(store, published, tmp_path / "out")
    dl.lock()
    _fill(dl, [0])
    actions = store.gc(drop_incomplete=True)
    assert any("a fetch is running" in a for a in actions)
    assert (dl.staging / "0.part").exists() or dl.staging.exists()
    assert store.downloads()
    dl.close()
    assert any("forgot" in a for a in store.gc(drop_incomplete=True))
