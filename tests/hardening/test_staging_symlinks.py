"""Staging never writes through a symlink someone else planted in the output directory.

Whoever can write in OUT can plant ``.autoglm-partial/<id>/<n>.part`` (or a
directory on the way, or a parent directory of a final file) as a symlink.
Before, the target was truncated and overwritten and the finished file became
a symlink to it; pieces written here were then served by sendfile without a
re-hash, so a file swapped in later leaked to peers. Now every staging path is
opened relative to directory fds with O_NOFOLLOW, a planted link is a clear
StorageError, the victim is untouched, and a piece whose file was swapped is no
longer trusted for serving.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from autoglm.node._publish import build_manifest
from autoglm.node._store import PARTIAL_DIR, Download, Store
from autoglm.node.errors import StorageError
from autoglm.protocol import (
    SignedManifest,
    encode_public_key,
    generate_private_key,
    key_id,
    parse_public_key,
    sign_manifest,
)

PIECE = 64 * 1024


def _publish(tmp: Path) -> tuple[Path, SignedManifest]:
    root = tmp / "published"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(os.urandom(3 * PIECE + 5))
    (root / "sub" / "b.bin").write_bytes(os.urandom(PIECE))
    key = generate_private_key()
    raw = parse_public_key(encode_public_key(key))
    m = build_manifest(root, name="t/m", version="1", publisher=key_id(raw), created_at=int(time.time()), max_piece=PIECE)
    return root, sign_manifest(m, key)


def _fill(dl: Download, root: Path) -> None:
    for i in dl.missing():
        f = dl.manifest.files[dl.file_of[i]]
        p = dl.pieces[i]
        dl.write(i, 0, (root / f.path).read_bytes()[p.offset : p.end])


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    root, signed = _publish(tmp_path)
    store = Store(tmp_path / "data")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    yield root, signed, store, tmp_path / "out", victim
    store.close()


def _staging(out: Path, signed: SignedManifest) -> Path:
    return out / PARTIAL_DIR / signed.id.hex()[:32]


def _assert_victim_intact(victim: Path) -> None:
    assert victim.read_bytes() == b"precious"


def test_planted_part_file_symlink_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    root, signed, store, out, victim = setup
    staging = _staging(out, signed)
    staging.mkdir(parents=True)
    (staging / "0.part").symlink_to(victim)
    dl = store.open_download(signed, out)
    with pytest.raises(StorageError, match="symlink"):
        _fill(dl, root)
    dl.close()
    _assert_victim_intact(victim)


@pytest.mark.parametrize("planted", [PARTIAL_DIR, "id"])
def test_planted_staging_directory_symlink_is_refused(setup, planted: str) -> None:  # type: ignore[no-untyped-def]
    root, signed, store, out, victim = setup
    elsewhere = victim.parent / "elsewhere"
    elsewhere.mkdir()
    if planted == PARTIAL_DIR:
        out.mkdir()
        (out / PARTIAL_DIR).symlink_to(elsewhere)
    else:
        (out / PARTIAL_DIR).mkdir(parents=True)
        _staging(out, signed).symlink_to(elsewhere)
    dl = store.open_download(signed, out)
    with pytest.raises(StorageError, match="symlink"):
        dl.lock()
        _fill(dl, root)
    dl.close()
    assert list(elsewhere.iterdir()) == []  # nothing was written through the link


def test_planted_hard_link_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    root, signed, store, out, victim = setup
    staging = _staging(out, signed)
    staging.mkdir(parents=True)
    os.link(victim, staging / "0.part")
    dl = store.open_download(signed, out)
    with pytest.raises(StorageError, match="link"):
        _fill(dl, root)
    dl.close()
    _assert_victim_intact(victim)


def test_planted_parent_directory_of_a_final_file_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    root, signed, store, out, victim = setup
    elsewhere = victim.parent / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(elsewhere)
    dl = store.open_download(signed, out)
    _fill(dl, root)
    with pytest.raises(StorageError, match="symlink"):
        dl.commit(list(range(len(dl.pieces))))
    dl.close()
    assert list(elsewhere.iterdir()) == []


def test_final_files_are_regular_files_and_swaps_are_not_trusted(setup) -> None:  # type: ignore[no-untyped-def]
    root, signed, store, out, victim = setup
    dl = store.open_download(signed, out)
    _fill(dl, root)
    dl.commit(list(range(len(dl.pieces))))
    assert dl.is_complete()
    dl.close()
    final = out / "a.bin"
    assert stat.S_ISREG(os.lstat(final).st_mode)
    assert final.read_bytes() == (root / "a.bin").read_bytes()
    assert store.written_here(signed.id, 0)
    # Keep our inode allocated so the filesystem cannot hand its number to a
    # swapped-in file (the check is by device and inode: a reused number would
    # pass, but such a file holds only bytes the swapper wrote, and receivers
    # hash-check every piece).
    ours = os.open(final, os.O_RDONLY)
    # Someone with write access to OUT swaps the finished file for a link to a secret.
    final.unlink()
    final.symlink_to(victim)
    assert not store.written_here(signed.id, 0)  # no sendfile without a fresh hash check
    # ... or for a hard link to a secret, or another regular file of the same size.
    final.unlink()
    os.link(victim, final)
    assert not store.written_here(signed.id, 1)
    other = out / "other"
    other.write_bytes(b"x" * (3 * PIECE + 5))
    os.replace(other, final)
    assert not store.written_here(signed.id, 2)
    os.close(ours)


def test_store_database_is_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    Store(data).close()
    assert stat.S_IMODE(os.stat(data / "store.sqlite").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    for side in ("store.sqlite-wal", "store.sqlite-shm"):
        if (data / side).exists():
            assert stat.S_IMODE(os.stat(data / side).st_mode) == 0o600


def test_existing_store_database_is_made_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    Store(data).close()
    os.chmod(data / "store.sqlite", 0o644)
    Store(data).close()
    assert stat.S_IMODE(os.stat(data / "store.sqlite").st_mode) == 0o600


def test_symlink_at_a_final_path_is_not_adopted_on_resume(setup) -> None:  # type: ignore[no-untyped-def]
    """A resume that finds OUT/<path> as a symlink to a copy of the file does not adopt (or crash on) it."""
    root, signed, store, out, victim = setup
    dl = store.open_download(signed, out)
    _fill(dl, root)
    dl.commit(list(range(len(dl.pieces))))
    dl.close()
    final = out / "a.bin"
    copy = victim.parent / "copy"
    copy.write_bytes(final.read_bytes())
    final.unlink()
    final.symlink_to(copy)  # the right bytes, behind a link someone else controls
    dl = store.open_download(signed, out)
    assert 0 in dl.missing()
    dl.close()
