"""What is on disk is what the records say: resume after a crash, stamps, adoption.

:class:`OnDisk` reconciles one :class:`~autoglm.node._store.Download`'s rows
with the files:

* on open (:meth:`OnDisk.load`): a finished file that is gone, truncated or a
  link is fetched again; a file killed between its rename and its row is
  re-hashed where it lies and adopted;
* after a crash (:meth:`OnDisk.recover`): staged regions that hold data
  (``SEEK_DATA``) but were never recorded are re-hashed and recorded again;
  the arrived prefix of a half-received piece is kept for a mirror to resume
  after (``Download.partial``);
* before a fetch (:meth:`OnDisk.check_finished`): a finished file whose
  (size, mtime_ns, inode) differs from its stamp is re-hashed; bad pieces
  send it back to staging to be fetched again;
* :meth:`OnDisk.adopt`: a file already in place (another tool wrote it) is
  recorded when it passes the whole-file check.

Blocking; the download calls it from a worker thread.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from autoglm.node._staging import (
    MIN_RESUME,
    data_prefix,
    drop_cache,
    fsync_dir,
    has_data,
    pread_nofollow,
    raise_os,
    sha256_fd,
)
from autoglm.node.errors import IntegrityError

if TYPE_CHECKING:
    from autoglm.node._store import Download

__all__ = ["UNKNOWN_HASH", "OnDisk", "stamp_of", "stamp_problem"]

#: The piece hash of an unsigned manifest whose piece hashes are learned on arrival.
UNKNOWN_HASH = bytes(32)


def stamp_of(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def stamp_problem(path: Path, size: int, stamp: tuple[int, int, int] | None) -> str | None:
    """Why a finished file cannot be taken as the one the store wrote, by ``stat`` alone; None if it can.

    A file without a stamp (finished before stamps existed) counts as whole
    here; the next fetch re-hashes it once and stamps it.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return "was deleted"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if st.st_size != size:
        return f"has {st.st_size} bytes, not {size}"
    if stamp is not None and stamp_of(st) != stamp:
        return "was changed after the fetch finished"
    return None


class OnDisk:
    """The reconciliation of one download's records with its files (see the module docstring)."""

    def __init__(self, download: Download) -> None:
        self._d = download
        self._db = download.store.db

    def _forget_file_pieces(self, fi: int, also_file: bool) -> None:
        d = self._d
        r = d.file_range(fi)
        self._db.transaction([("DELETE FROM pieces WHERE download_id=? AND idx>=? AND idx<?", (d.id, r.start, r.stop))]
                             + ([("DELETE FROM files WHERE download_id=? AND file_index=?", (d.id, fi))] if also_file else []))
        d.done -= set(r)

    def load(self) -> None:
        """Read the rows; forget finished files that are no longer what was written, adopt files killed mid-rename."""
        d = self._d
        rows = self._db.query("SELECT idx, hash FROM pieces WHERE download_id=?", (d.id,))
        d.done = {int(r[0]) for r in rows}
        d.learned = {int(i): bytes(h) for i, h in rows if d.pieces[int(i)].hash == UNKNOWN_HASH}
        d.complete_files = self._db.complete_files(d.id)
        for fi in list(d.complete_files):
            f = d.manifest.files[fi]
            try:
                fst = (d.out_dir / f.path).lstat()
                ok = stat.S_ISREG(fst.st_mode) and fst.st_size == f.size
            except OSError:
                ok = False
            if not ok:  # deleted, truncated or replaced by a link: fetch it again
                self._forget_file_pieces(fi, also_file=True)
                d.complete_files.discard(fi)
        for fi in d.wanted_files:
            if fi in d.complete_files:
                continue
            final = d.out_dir / d.manifest.files[fi].path
            if not d.staging_files.exists(fi) and any(i in d.done for i in d.file_range(fi)):
                # Killed between rename and the row update, or staging removed: trust only what re-verifies.
                self._forget_file_pieces(fi, also_file=False)
                if final.exists() and final.stat().st_size == d.manifest.files[fi].size:
                    self._adopt_final(fi, final)

    def _adopt_final(self, fi: int, final: Path) -> None:
        d = self._d
        good = []
        for i in d.file_range(fi):
            p = d.pieces[i]
            try:
                data = pread_nofollow(final, p.offset, p.length)
            except OSError:  # a symlink planted at the final path (O_NOFOLLOW), or gone: fetch it again
                return
            if blake3.blake3(data).digest() == p.hash:
                good.append(i)
        if len(good) == len(d.file_range(fi)):
            self._db.transaction([("INSERT OR IGNORE INTO pieces VALUES (?,?,?)", (d.id, i, d.pieces[i].hash)) for i in good]
                                 + [("INSERT OR REPLACE INTO files VALUES (?,?,1)", (d.id, fi))])
            d.done |= set(good)
            d.complete_files.add(fi)
            self.stamp(fi)

    def adopt(self, fi: int) -> bool:
        """Record a file already in place (written by another tool or run) if it passes ``file_check``.

        Its pieces are hashed and recorded (learned where the manifest has no hash).
        """
        d = self._d
        f = d.manifest.files[fi]
        try:
            fd = os.open(d.out_dir / f.path, os.O_RDONLY | os.O_NOFOLLOW)  # never adopt a link someone planted
        except OSError:
            return False
        try:
            if os.fstat(fd).st_size != f.size:
                return False
            if d.file_check is not None:
                try:
                    d.file_check(fi, fd)
                except IntegrityError:
                    return False
            rows = []
            for i in d.file_range(fi):
                p = d.pieces[i]
                h = blake3.blake3(os.pread(fd, p.length, p.offset)).digest()
                if p.hash != UNKNOWN_HASH and h != p.hash:
                    return False
                rows.append((i, h))
        finally:
            os.close(fd)
        self._db.transaction([("INSERT OR REPLACE INTO pieces VALUES (?,?,?)", (d.id, i, h)) for i, h in rows]
                             + [("INSERT OR REPLACE INTO files VALUES (?,?,1)", (d.id, fi))])
        for i, h in rows:
            d.done.add(i)
            if d.pieces[i].hash == UNKNOWN_HASH:
                d.learned[i] = h
        d.complete_files.add(fi)
        self.stamp(fi)
        return True

    def recover(self) -> list[int]:
        """Re-hash staged pieces that hold data but were never recorded (a crash before commit).

        Holes are skipped with SEEK_DATA, so a fresh sparse file costs nothing.
        """
        d = self._d
        found = []
        for fi in d.wanted_files:
            if fi in d.complete_files or not d.staging_files.exists(fi):
                continue
            fd = d.staging_files.fd(fi)
            for i in d.file_range(fi):
                if i in d.done:
                    continue
                p = d.pieces[i]
                data = has_data(fd, p.offset, p.end)
                if data and blake3.blake3(os.pread(fd, p.length, p.offset)).digest() == p.hash:
                    found.append(i)
                    d.staging_files.mark_dirty(fi)
                elif data:
                    prefix = data_prefix(fd, p.offset, p.length)
                    if prefix >= MIN_RESUME:
                        d.partial[i] = prefix
        return found

    def stamp(self, fi: int) -> None:
        """Record what finished file ``fi`` looks like now (it was just verified)."""
        d = self._d
        try:
            st = (d.out_dir / d.manifest.files[fi].path).stat()
        except OSError:
            return  # the next check finds it missing
        self._db.set_stamp(d.id, fi, stamp_of(st))

    def check_finished(self, full: bool = False) -> list[int]:
        """Re-check finished files before a fetch; returns the pieces that no longer match.

        Cheap by default: a file whose (size, mtime_ns, inode) equals its stamp
        is taken as written; any other is re-hashed piece by piece. ``full``
        re-hashes every finished file and checks its SHA-256 too. A file with
        bad pieces goes back to staging: its good pieces stay, the bad ones are
        fetched again, and the file is moved into place when whole. Call with
        the download's lock held (the engine does).
        """
        d = self._d
        stamps = self._db.stamps(d.id)
        lost: list[int] = []
        for fi in sorted(d.complete_files & set(d.wanted_files)):
            f = d.manifest.files[fi]
            final = d.out_dir / f.path
            try:
                st = final.stat()
            except OSError:
                continue  # load already forgot a missing file
            if not f.pieces or (not full and stamps.get(fi) == stamp_of(st)):
                continue
            bad = self._rehash_final(fi, final, full)
            if bad:
                self._unfinish(fi, bad)
                lost += bad
            else:
                self.stamp(fi)
        return lost

    def _rehash_final(self, fi: int, final: Path, full: bool) -> list[int]:
        """Pieces of finished file ``fi`` whose bytes no longer match their hash."""
        d = self._d
        f = d.manifest.files[fi]
        try:
            fd = os.open(final, os.O_RDONLY)
        except OSError as exc:
            raise_os(exc, f"re-reading {f.path}")
        try:
            bad = []
            r = d.file_range(fi)
            for i in r:
                p = d.pieces[i]
                data = os.pread(fd, p.length, p.offset)
                drop_cache(fd, p.offset, p.length)
                if blake3.blake3(data).digest() != d.piece_hash(i):
                    bad.append(i)
            if bad and any(d.pieces[i].hash == UNKNOWN_HASH for i in r):
                # Learned hashes (a hub file) vouch for nothing new: the whole
                # file is fetched again and checked whole (file_check).
                return list(r)
            if full and not bad and f.sha256 != bytes(32) and sha256_fd(fd, f.size) != f.sha256:
                raise IntegrityError(f"{f.path}: every piece matches but the file's SHA-256 does not; the manifest is inconsistent")
            return bad
        finally:
            os.close(fd)

    def _unfinish(self, fi: int, bad: list[int]) -> None:
        """Move finished file ``fi`` back to staging and forget its ``bad`` pieces, so they are fetched again."""
        d = self._d
        f = d.manifest.files[fi]
        try:
            if any(d.pieces[i].hash == UNKNOWN_HASH for i in d.file_range(fi)):
                # Staged bytes of unknown-hash pieces would be resumed from: start the file afresh.
                (d.out_dir / f.path).unlink()
            else:
                d.staging.mkdir(parents=True, exist_ok=True)
                os.replace(d.out_dir / f.path, d.staging / f"{fi}.part")
                fsync_dir(d.staging)
        except OSError as exc:
            raise_os(exc, f"moving {f.path} back to staging for repair")
        self._db.transaction([
            *(("DELETE FROM pieces WHERE download_id=? AND idx=?", (d.id, i)) for i in bad),
            ("DELETE FROM files WHERE download_id=? AND file_index=?", (d.id, fi)),
            ("DELETE FROM file_stamps WHERE download_id=? AND file_index=?", (d.id, fi)),
            ("UPDATE downloads SET completed=NULL WHERE id=?", (d.id,)),
        ])
        d.complete_files.discard(fi)
        d.done -= set(bad)
        for i in bad:
            d.learned.pop(i, None)
        d.store.forget_written(d.manifest_id, d.file_range(fi))
