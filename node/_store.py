"""The durable local store: which pieces are verified, where their bytes are, and serving them.

Strategy (why it survives ``kill -9`` at any instant):

* State lives in one SQLite database, ``DATA_DIR/store.sqlite`` (WAL,
  ``synchronous=FULL``). A row in ``pieces`` means "these bytes matched the
  manifest hash and were fdatasync'ed before the row was committed".
* Bytes are written in place (``os.pwrite``) into a sparse staging file per
  file, ``OUT/.autoglm-partial/<manifest id>/<file index>.part``. Keeping the
  staging area beside the destination makes the final ``rename`` atomic (same
  filesystem) and makes the free-space check look at the right disk.
* Group commit: writers hand verified pieces to :meth:`Download.commit`, which
  fdatasyncs every dirty staging file once and then records all those pieces
  in one transaction. A crash before the commit loses only those pieces'
  *record*; on the next open, :meth:`Download.recover` re-hashes the staging
  regions that hold data (``SEEK_DATA``) and re-records what still matches,
  so a killed process re-fetches only pieces that were partly received.
* When every piece of a file is recorded, the file is renamed to
  ``OUT/<path>`` (then the directory is fsync'ed) and its row says so.
* ``pieces.hash`` is indexed: a piece with the same BLAKE3 hash in any other
  download is copied locally instead of downloaded.
* Serving (the swarm): :meth:`Store.piece_location` says where a verified piece
  lies; the peerwire server re-checks its hash unless this process wrote it.
* Unsigned manifests (a hub fetch: ``node/hub``) may leave piece hashes
  unknown (:data:`UNKNOWN_HASH`): the engine hashes such a piece as it
  arrives and the row records that hash; the file is checked whole by
  :attr:`Download.file_check` before it is moved into place. Unsigned
  downloads are never listed by :meth:`Store.manifest_ids` (what the swarm
  announces).
* Nothing in OUT is trusted to be what we left there: anyone who can write
  in OUT can plant symlinks or hard links. Staging files and every directory
  below OUT are opened relative to directory fds with ``O_NOFOLLOW``
  (:func:`_open_dir`), a staging file must be a regular file with one link,
  a finished file is renamed between directory fds, and a piece written here
  is trusted for serving without a re-hash only while its file is still the
  inode we wrote (:meth:`Store.written_here`).

The store is blocking code; the engine calls it through ``trio.to_thread``.
One lock serialises the SQLite connection.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import blake3

from autoglm.node.errors import DiskFullError, IntegrityError, StorageError
from autoglm.protocol import (
    Manifest,
    Piece,
    SignedManifest,
    decode_manifest,
    decode_signed_manifest,
)
from autoglm.protocol._signing import MAGIC

__all__ = [
    "FileCheckFailed",
    "PARTIAL_DIR",
    "UNKNOWN_HASH",
    "Download",
    "DownloadInfo",
    "PieceLocation",
    "Store",
    "find_completed_download",
    "find_download_at",
    "preflight",
]

#: The piece hash of an unsigned manifest whose piece hashes are learned on arrival.
UNKNOWN_HASH = bytes(32)

PARTIAL_DIR = ".autoglm-partial"
SCHEMA = """
CREATE TABLE IF NOT EXISTS downloads (
    id INTEGER PRIMARY KEY,
    manifest_id BLOB NOT NULL,
    out_dir TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    signed BLOB NOT NULL,
    wanted TEXT,
    created REAL NOT NULL,
    completed REAL,
    UNIQUE (manifest_id, out_dir)
);
CREATE TABLE IF NOT EXISTS files (
    download_id INTEGER NOT NULL,
    file_index INTEGER NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (download_id, file_index)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pieces (
    download_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (download_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pieces_by_hash ON pieces (hash);
"""
# What a finished file looked like when the store moved it into place: a
# re-run compares (size, mtime_ns, inode) and re-hashes a file whose stamp
# differs (edited, replaced, restored from a copy). No stamp: hashed once.
STAMP_SCHEMA = """
CREATE TABLE IF NOT EXISTS file_stamps (
    download_id INTEGER NOT NULL,
    file_index INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    PRIMARY KEY (download_id, file_index)
) WITHOUT ROWID;
"""


class FileCheckFailed(IntegrityError):
    """A finished file failed its whole-file check; its pieces were discarded."""

    def __init__(self, message: str, file_index: int) -> None:
        super().__init__(message)
        self.file_index = file_index


@dataclass(frozen=True, slots=True)
class PieceLocation:
    """Where a verified piece's bytes are on disk, and the hash to re-check them by."""

    path: Path
    offset: int
    length: int
    hash: bytes
    #: verified, written and synced by this process: serve without a fresh hash check
    trusted: bool = False


@dataclass(frozen=True, slots=True)
class DownloadInfo:
    """One row of ``autoglm-node ls``."""

    manifest_id: bytes
    name: str
    version: str
    out_dir: Path
    pieces_done: int
    pieces_total: int
    bytes_done: int
    bytes_total: int
    completed: bool
    #: why a download the store finished is no longer whole on disk (a file deleted or changed), or None
    problem: str | None = None


def _raise_os(exc: OSError, what: str) -> NoReturn:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(
            f"the disk is full while {what}; free some space and run the same command again "
            "(every verified piece is kept)"
        ) from exc
    raise StorageError(f"{what}: {exc.strerror or exc}") from exc


class _PieceMap:
    """Global piece index <-> (file index, piece), for one manifest."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.file_of: list[int] = []
        self.pieces: list[Piece] = []
        self.file_starts: list[int] = []
        for fi, f in enumerate(manifest.files):
            self.file_starts.append(len(self.pieces))
            for p in f.pieces:
                self.file_of.append(fi)
                self.pieces.append(p)

    def file_range(self, fi: int) -> range:
        return range(self.file_starts[fi], self.file_starts[fi] + len(self.manifest.files[fi].pieces))


class Store:
    """The store under one data directory. Thread-safe; blocking."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        try:
            if not data_dir.exists():
                data_dir.mkdir(parents=True, mode=0o700)
            db_path = data_dir / "store.sqlite"
            # Private to this user (the WAL and shm files take the database's mode).
            os.close(os.open(db_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            for side in ("", "-wal", "-shm"):
                if os.path.exists(f"{db_path}{side}"):
                    os.chmod(f"{db_path}{side}", 0o600)
            self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._db.executescript(STAMP_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the store in {data_dir}: {exc}; check --data-dir and its permissions") from exc
        self._lock = threading.Lock()
        self._maps: dict[bytes, _PieceMap] = {}
        # (manifest id, piece) this process hash-checked, wrote and fdatasynced,
        # with the (device, inode) of the file written: uploads of these go out
        # by sendfile without a fresh hash check while that file is still there.
        self._written_here: dict[tuple[bytes, int], tuple[int, int]] = {}

    def written_here(self, manifest_id: bytes, index: int) -> bool:
        """True when this process verified and wrote this piece itself, into the file now at its path.

        A file swapped since (replaced, or turned into a symlink) is not
        trusted: the caller re-hashes what it reads, so nothing but the
        published bytes can go out.
        """
        ident = self._written_here.get((manifest_id, index))
        if ident is None:
            return False
        for _, loc in self._locations(manifest_id, index):
            try:
                st = os.lstat(loc.path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == ident:
                return True
        self._written_here.pop((manifest_id, index), None)
        return False

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- internal ----------------------------------------------------------
    def _q(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as exc:
                if "full" in str(exc):
                    raise DiskFullError(f"the disk holding {self.data_dir} is full; free some space and run again") from exc
                raise StorageError(f"store database: {exc}") from exc

    def _tx(self, statements: Iterable[tuple[str, tuple[object, ...]]]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, args in statements:
                        self._db.execute(sql, args)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if "full" in str(exc):
                    raise DiskFullError(f"the disk holding {self.data_dir} is full; free some space and run again") from exc
                raise StorageError(f"store database: {exc}") from exc

    def _map(self, manifest_id: bytes, signed_blob: bytes | None = None) -> _PieceMap:
        pm = self._maps.get(manifest_id)
        if pm is None:
            if signed_blob is None:
                rows = self._q("SELECT signed FROM downloads WHERE manifest_id=? LIMIT 1", (manifest_id,))
                if not rows:
                    raise StorageError(f"manifest {manifest_id.hex()[:16]} is not in the store")
                signed_blob = rows[0][0]
            assert signed_blob is not None
            blob = bytes(signed_blob)
            pm = _PieceMap(decode_signed_manifest(blob).manifest if blob.startswith(MAGIC) else decode_manifest(blob))
            self._maps[manifest_id] = pm
        return pm

    # -- downloads ---------------------------------------------------------
    def open_download(self, signed: SignedManifest | Manifest, out_dir: Path, files: Iterable[str] | None = None) -> Download:
        """Create or resume the download of ``signed`` (already verified) into ``out_dir``.

        An unsigned :class:`Manifest` (a hub fetch) is stored as it is and never announced.
        """
        out_dir = out_dir.resolve()
        wanted = None if files is None else sorted(set(files))
        blob = signed.encode()
        mid = signed.id
        m = signed.manifest if isinstance(signed, SignedManifest) else signed
        self._q(
            "INSERT OR IGNORE INTO downloads (manifest_id, out_dir, name, version, signed, wanted, created) "
            "VALUES (?,?,?,?,?,?,?)",
            (mid, str(out_dir), m.name, m.version, blob, json.dumps(wanted), time.time()),
        )
        rows = self._q("SELECT id, wanted FROM downloads WHERE manifest_id=? AND out_dir=?", (mid, str(out_dir)))
        did = int(rows[0][0])
        old = json.loads(str(rows[0][1]))
        if old is not None and (wanted is None or set(wanted) - set(old)):
            merged = None if wanted is None else sorted(set(old) | set(wanted))
            self._q("UPDATE downloads SET wanted=?, completed=NULL WHERE id=?", (json.dumps(merged), did))
        return Download(self, did, mid, self._map(mid, blob), out_dir, wanted)

    def downloads(self) -> list[DownloadInfo]:
        out = []
        for did, mid, out_dir, name, version, completed, wanted in self._q(
            "SELECT id, manifest_id, out_dir, name, version, completed, wanted FROM downloads ORDER BY name, version"
        ):
            pm = self._map(mid)
            want = json.loads(str(wanted))
            idxs = [i for i in range(len(pm.pieces)) if want is None or pm.manifest.files[pm.file_of[i]].path in want]
            done = {int(r[0]) for r in self._q("SELECT idx FROM pieces WHERE download_id=?", (did,))}
            out.append(
                DownloadInfo(
                    manifest_id=mid,
                    name=str(name),
                    version=str(version),
                    out_dir=Path(str(out_dir)),
                    pieces_done=sum(1 for i in idxs if i in done),
                    pieces_total=len(idxs),
                    bytes_done=sum(pm.pieces[i].length for i in idxs if i in done),
                    bytes_total=sum(pm.pieces[i].length for i in idxs),
                    completed=completed is not None,
                )
            )
        return [self._on_disk(info) for info in out]

    def _on_disk(self, info: DownloadInfo) -> DownloadInfo:
        """``info``, not complete when a finished file is gone or differs from its stamp (``ls``)."""
        if not info.completed:
            return info
        rows = self._q("SELECT id, wanted FROM downloads WHERE manifest_id=? AND out_dir=?", (info.manifest_id, str(info.out_dir)))
        if not rows:
            return info
        did, wanted = int(rows[0][0]), json.loads(str(rows[0][1]))
        pm = self._map(info.manifest_id)
        stamps = self._stamps(did)
        for fi, f in enumerate(pm.manifest.files):
            if wanted is not None and f.path not in wanted:
                continue
            problem = _stamp_problem(info.out_dir / f.path, f.size, stamps.get(fi))
            if problem:
                return dataclasses.replace(info, completed=False, problem=f"{f.path} {problem}")
        return info

    def _stamps(self, download_id: int) -> dict[int, tuple[int, int, int]]:
        rows = self._q("SELECT file_index, size, mtime_ns, ino FROM file_stamps WHERE download_id=?", (download_id,))
        return {int(fi): (int(a), int(b), int(c)) for fi, a, b, c in rows}

    # -- serving (used by the swarm) ----------------------------------------
    def _locations(self, manifest_id: bytes, index: int) -> Iterator[tuple[int, PieceLocation]]:
        pm = self._map(manifest_id)
        for did, out_dir, complete in self._q(
            "SELECT d.id, d.out_dir, f.complete FROM downloads d JOIN pieces p ON p.download_id=d.id "
            "LEFT JOIN files f ON f.download_id=d.id AND f.file_index=? WHERE d.manifest_id=? AND p.idx=?",
            (pm.file_of[index], manifest_id, index),
        ):
            yield int(did), _location(pm, Path(str(out_dir)), manifest_id, index, bool(complete))

    def verified_pieces(self, manifest_id: bytes) -> set[int]:
        """Indices (order of ``manifest.iter_pieces()``) of every verified piece, across downloads."""
        rows = self._q(
            "SELECT DISTINCT p.idx FROM pieces p JOIN downloads d ON p.download_id=d.id WHERE d.manifest_id=?",
            (manifest_id,),
        )
        return {int(r[0]) for r in rows}

    def bitfield(self, manifest_id: bytes) -> bytes:
        """Verified pieces as a bitfield: bit i is piece i, most significant bit of byte 0 first."""
        n = len(self._map(manifest_id).pieces)
        bits = bytearray((n + 7) // 8)
        for i in self.verified_pieces(manifest_id):
            bits[i >> 3] |= 0x80 >> (i & 7)
        return bytes(bits)

    def manifest(self, manifest_id: bytes) -> Manifest:
        """The manifest of a download in the store; StorageError if there is none."""
        return self._map(manifest_id).manifest

    def manifest_ids(self) -> list[bytes]:
        """Signed manifests only: an unsigned (hub) download is never announced to peers."""
        return [r[0] for r in self._q("SELECT DISTINCT manifest_id FROM downloads WHERE substr(signed, 1, ?) = ?", (len(MAGIC), MAGIC))]

    def piece_location(self, manifest_id: bytes, index: int) -> PieceLocation:
        """Where a verified piece lies (for sendfile); the caller re-checks the hash (see node/_peerwire.py)."""
        for _, loc in self._locations(manifest_id, index):
            return loc
        raise StorageError(f"piece {index} of {manifest_id.hex()[:16]} is not verified here")

    def find_by_hash(self, piece_hash: bytes, exclude_download: int | None = None) -> PieceLocation | None:
        """A verified piece anywhere in the store with this BLAKE3 hash (for local copies)."""
        rows = self._q(
            "SELECT d.id, d.manifest_id, d.out_dir, p.idx FROM pieces p JOIN downloads d ON p.download_id=d.id "
            "WHERE p.hash=? AND d.id IS NOT ? LIMIT 4",
            (piece_hash, exclude_download),
        )
        for did, mid, out_dir, idx in rows:
            pm = self._map(mid)
            fi = pm.file_of[int(idx)]
            c = self._q("SELECT complete FROM files WHERE download_id=? AND file_index=?", (did, fi))
            loc = _location(pm, Path(str(out_dir)), mid, int(idx), bool(c and c[0][0]))
            if loc.path.exists():
                return loc
        return None

    def _forget(self, download_id: int) -> None:
        self._tx([("DELETE FROM pieces WHERE download_id=?", (download_id,)),
                  ("DELETE FROM files WHERE download_id=?", (download_id,)),
                  ("DELETE FROM file_stamps WHERE download_id=?", (download_id,)),
                  ("DELETE FROM downloads WHERE id=?", (download_id,))])

    # -- gc ------------------------------------------------------------------
    def _gc_unfinished(self, drop_incomplete: bool) -> list[str]:
        """Unfinished downloads: forget those that hold nothing (a failed start), and with
        ``drop_incomplete`` every one, with the finished files it put in place and its staging.

        A finished file is removed only while it is still the one the store
        wrote (its stamp matches); anything else in the output directory stays.
        """
        done: list[str] = []
        rows = self._q("SELECT id, manifest_id, out_dir FROM downloads WHERE completed IS NULL")
        for did, mid, out_dir in rows:
            did, od = int(did), Path(str(out_dir))
            staging = _staging_dir(od, bytes(mid))
            m = self._map(mid).manifest
            if _in_use(staging):
                continue  # the main pass reports it
            pieces = self._q("SELECT 1 FROM pieces WHERE download_id=? LIMIT 1", (did,))
            finished = [int(r[0]) for r in self._q("SELECT file_index FROM files WHERE download_id=? AND complete=1", (did,))]
            if not drop_incomplete and (pieces or finished or _holds_data(staging)):
                continue
            stamps = self._stamps(did)
            removed, kept = 0, []
            for fi in finished:
                path = od / m.files[fi].path
                if fi in stamps and _stamp_problem(path, m.files[fi].size, stamps[fi]) is None:
                    path.unlink()
                    removed += 1
                elif path.exists():
                    kept.append(m.files[fi].path)
            self._forget(did)
            _remove_staging(od, staging)
            _remove_empty_dirs(od, {od / m.files[fi].path for fi in finished})
            what = "an unfinished download" if pieces or finished else "a failed start (nothing fetched)"
            line = f"forgot {m.name} {m.version} in {od}: {what}"
            if removed:
                line += f"; removed {removed} finished file(s)"
            if kept:
                line += f"; kept {len(kept)} changed file(s): {', '.join(kept[:3])}"
            done.append(line)
        return done

    def gc(self, *, drop_incomplete: bool = False) -> list[str]:
        """Remove stale staging files and forget data that is gone. Returns what was done, one line each."""
        done: list[str] = self._gc_unfinished(drop_incomplete)
        known: set[Path] = set()
        out_dirs: set[Path] = set()
        for did, mid, out_dir, completed in self._q("SELECT id, manifest_id, out_dir, completed FROM downloads"):
            od = Path(str(out_dir))
            out_dirs.add(od)
            staging = od / PARTIAL_DIR / bytes(mid).hex()[:32]
            pm = self._map(mid)
            complete_files = {int(r[0]) for r in self._q("SELECT file_index FROM files WHERE download_id=? AND complete=1", (did,))}
            gone = [fi for fi in complete_files if not (od / pm.manifest.files[fi].path).exists()]
            if _in_use(staging):
                known.add(staging)
                done.append(f"skipped {pm.manifest.name} {pm.manifest.version} in {od}: a fetch is running")
                continue
            if not od.exists() or (completed is None and drop_incomplete) or (gone and len(gone) == len(complete_files) and completed is not None):
                self._tx([("DELETE FROM pieces WHERE download_id=?", (did,)), ("DELETE FROM files WHERE download_id=?", (did,)),
                          ("DELETE FROM downloads WHERE id=?", (did,))])
                done.append(f"forgot {pm.manifest.name} {pm.manifest.version} in {od}")
                continue
            for fi in gone:
                r = pm.file_range(fi)
                self._tx([("DELETE FROM pieces WHERE download_id=? AND idx>=? AND idx<?", (did, r.start, r.stop)),
                          ("DELETE FROM files WHERE download_id=? AND file_index=?", (did, fi)),
                          ("UPDATE downloads SET completed=NULL WHERE id=?", (did,))])
                done.append(f"forgot deleted file {od / pm.manifest.files[fi].path}")
            if completed is None:
                known.add(staging)
        for od in out_dirs:
            part = od / PARTIAL_DIR
            if not part.is_dir():
                continue
            for d in part.iterdir():
                if d not in known and not _in_use(d):
                    shutil.rmtree(d, ignore_errors=True)
                    done.append(f"removed stale staging {d}")
            if not any(part.iterdir()):
                part.rmdir()
        return done


def _in_use(staging: Path) -> bool:
    """Whether a running fetch holds this staging directory's lock."""
    try:
        fd = os.open(staging / ".lock", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _holds_data(staging: Path) -> bool:
    """Whether a staging directory holds any received bytes (a sparse, untouched file holds none)."""
    try:
        parts = [p for p in staging.iterdir() if p.suffix == ".part"]
    except OSError:
        return False
    for p in parts:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.lseek(fd, 0, os.SEEK_DATA)
            return True
        except OSError:
            continue  # ENXIO: all hole
        finally:
            os.close(fd)
    return False


def _remove_empty_dirs(out_dir: Path, files: set[Path]) -> None:
    """Remove the now empty directories that held ``files``, up to and including ``out_dir``."""
    dirs = {out_dir}
    for f in files:
        d = f.parent
        while d != out_dir and out_dir in d.parents:
            dirs.add(d)
            d = d.parent
    for d in sorted(dirs, key=lambda d: -len(d.parts)):  # deepest first
        try:
            d.rmdir()
        except OSError:
            pass


def _remove_staging(out_dir: Path, staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (out_dir / PARTIAL_DIR).rmdir()  # only when empty: other downloads may share it
    except OSError:
        pass


def _staging_dir(out_dir: Path, manifest_id: bytes) -> Path:
    return out_dir / PARTIAL_DIR / manifest_id.hex()[:32]


def _stamp_of(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _stamp_problem(path: Path, size: int, stamp: tuple[int, int, int] | None) -> str | None:
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
    if stamp is not None and _stamp_of(st) != stamp:
        return "was changed after the fetch finished"
    return None


def _location(pm: _PieceMap, out_dir: Path, manifest_id: bytes, index: int, complete: bool) -> PieceLocation:
    fi = pm.file_of[index]
    p = pm.pieces[index]
    path = out_dir / pm.manifest.files[fi].path if complete else _staging_dir(out_dir, manifest_id) / f"{fi}.part"
    return PieceLocation(path, p.offset, p.length, p.hash)


# Drop-behind: once a piece is durable (fdatasync) or has been read for
# hashing or upload, its page-cache pages are handed back at once. A model is
# written once and read a few times, so caching it evicts the host's working
# set for nothing; and fresh page-cache pages are expensive: on the development
# VM, pwrite of 4 GiB cost 7.7 CPU-s with the pages kept and 1.2 CPU-s with
# fdatasync + POSIX_FADV_DONTNEED per 8 MiB, and a cold re-read by sendfile
# runs at ~2 GB/s (docs/benchmarks.md). AUTOGLM_KEEP_PAGE_CACHE=1 turns it off.
DROP_BEHIND = os.environ.get("AUTOGLM_KEEP_PAGE_CACHE", "0") != "1"


def drop_cache(fd: int, offset: int, length: int) -> None:
    """Advise the kernel to drop clean cached pages of this range (no-op when disabled)."""
    if DROP_BEHIND and length > 0:
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):  # advice only; some filesystems / platforms refuse
            pass


def find_completed_download(data_dir: Path, name: str, version: str = "") -> tuple[Path, bytes] | None:
    """(out dir, signed manifest) of the newest completed download of NAME[@VERSION] under ``data_dir``.

    Read-only: opens no Store (the load gate asks this of data directories
    it must not change); None when there is no store or no such download.
    """
    db = data_dir / "store.sqlite"
    if not db.exists():
        return None
    # Signed manifests only: a hub download (unsigned, hub-attested) is not a gate's manifest.
    sql = "SELECT out_dir, signed FROM downloads WHERE name=? AND completed IS NOT NULL AND substr(signed, 1, ?) = ?"
    args: tuple[object, ...] = (name, len(MAGIC), MAGIC)
    if version:
        sql += " AND version=?"
        args += (version,)
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = con.execute(sql + " ORDER BY created DESC LIMIT 1", args).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return (Path(row[0]), bytes(row[1])) if row else None


def find_download_at(data_dir: Path, out_dir: Path) -> bytes | None:
    """The signed manifest of the newest completed download into ``out_dir`` under ``data_dir``, or None.

    Read-only, like :func:`find_completed_download`: ``open_model(path)`` finds
    the manifest that vouches for a fetched directory without a manifest file.
    """
    db = data_dir / "store.sqlite"
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = con.execute(
                "SELECT signed FROM downloads WHERE out_dir=? AND completed IS NOT NULL ORDER BY created DESC LIMIT 1",
                (str(out_dir),),
            ).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return bytes(row[0]) if row else None


def _pread(loc: PieceLocation) -> bytes:
    fd = os.open(loc.path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        data = os.pread(fd, loc.length, loc.offset)
        drop_cache(fd, loc.offset, loc.length)
        return data
    finally:
        os.close(fd)


MIN_RESUME = 16 << 10


def _data_prefix(fd: int, offset: int, length: int) -> int:
    """How many bytes from ``offset`` are data (not a hole), rounded down to 4 KiB, below ``length``.

    Pieces are written front to back, so after a crash this is the part of a
    piece that arrived. It is unverified: the piece hash decides later.
    """
    try:
        if os.lseek(fd, offset, os.SEEK_DATA) != offset:
            return 0
        hole = os.lseek(fd, offset, os.SEEK_HOLE)
    except OSError:
        return 0
    n = min(hole - offset, length - 1)
    return max(0, n - n % 4096)


def _sha256_fd(fd: int, size: int) -> bytes:
    h = hashlib.sha256()
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(8 << 20, size - pos), pos)
        if not chunk:
            break
        h.update(chunk)
        drop_cache(fd, pos, len(chunk))
        pos += len(chunk)
    return h.digest()


def _open_dir(parent_fd: int, name: str, where: Path, create: bool = True) -> int:
    """A directory fd for ``name`` under ``parent_fd``, never through a symlink."""
    if create:
        try:
            os.mkdir(name, 0o755, dir_fd=parent_fd)
        except FileExistsError:
            pass
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StorageError(
                f"{where / name} is a symlink or not a directory; refusing to write through it "
                "(someone else may control it: remove it and run the command again)"
            ) from exc
        raise


def _open_file(dir_fd: int, name: str, where: Path, create: bool) -> int:
    """A staging file of ours: a regular file with one link, opened without following a symlink."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if create else 0), 0o644, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StorageError(f"{where / name} is a symlink; refusing to write through it (remove it)") from exc
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise StorageError(f"{where / name} is not a regular file with one link; refusing to write to it (remove it)")
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Download:
    """One manifest being assembled into one output directory. Blocking; use from a worker thread."""

    def __init__(self, store: Store, did: int, manifest_id: bytes, pm: _PieceMap, out_dir: Path, wanted: list[str] | None) -> None:
        self.store = store
        self.id = did
        self.manifest_id = manifest_id
        self.manifest = pm.manifest
        self._pm = pm
        self.out_dir = out_dir
        self.staging = _staging_dir(out_dir, manifest_id)
        want = None if wanted is None else set(wanted)
        self.wanted_files = [fi for fi, f in enumerate(self.manifest.files) if want is None or f.path in want]
        self.wanted = [i for fi in self.wanted_files for i in pm.file_range(fi)]
        self._fds: dict[int, int] = {}
        self._dirty: set[int] = set()
        self._fd_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._staging_fd: int | None = None
        self._staging_lock = threading.Lock()
        #: piece -> bytes at its start already in the staging file (a crash mid-piece); filled by recover()
        self.partial: dict[int, int] = {}
        self.check_sha256 = False  # also check each finished file's SHA-256 (costs a read of the file)
        self._out_existed = out_dir.exists()  # a failed start removes only an output directory it created
        #: Whole-file check before a file is moved into place: (file index, fd of the staged file).
        #: Raises IntegrityError; the file's pieces are then discarded (node/hub sets it).
        self.file_check: Callable[[int, int], None] | None = None
        #: Piece hashes learned on arrival, for pieces whose manifest hash is UNKNOWN_HASH.
        self.learned: dict[int, bytes] = {}
        #: Drop committed pieces from the page cache at once; False when the caller reads them
        #: back soon (node/hub hashes files in byte order) and drops them itself (:meth:`uncache`).
        self.drop_behind = True
        self.done: set[int] = set()
        self.complete_files: set[int] = set()
        self._load()

    @property
    def pieces(self) -> list[Piece]:
        return self._pm.pieces

    @property
    def file_of(self) -> list[int]:
        return self._pm.file_of

    @property
    def file_starts(self) -> list[int]:
        return self._pm.file_starts

    def _load(self) -> None:
        st = self.store
        rows = st._q("SELECT idx, hash FROM pieces WHERE download_id=?", (self.id,))
        self.done = {int(r[0]) for r in rows}
        self.learned = {int(i): bytes(h) for i, h in rows if self._pm.pieces[int(i)].hash == UNKNOWN_HASH}
        self.complete_files = {int(r[0]) for r in st._q("SELECT file_index FROM files WHERE download_id=? AND complete=1", (self.id,))}
        for fi in list(self.complete_files):
            f = self.manifest.files[fi]
            final = self.out_dir / f.path
            try:
                fst = final.lstat()
                ok = stat.S_ISREG(fst.st_mode) and fst.st_size == f.size
            except OSError:
                ok = False
            if not ok:  # deleted, truncated or replaced by a link: fetch it again
                r = self._pm.file_range(fi)
                st._tx([("DELETE FROM pieces WHERE download_id=? AND idx>=? AND idx<?", (self.id, r.start, r.stop)),
                        ("DELETE FROM files WHERE download_id=? AND file_index=?", (self.id, fi))])
                self.complete_files.discard(fi)
                self.done -= set(r)
        for fi in self.wanted_files:
            if fi in self.complete_files:
                continue
            staged = self.staging / f"{fi}.part"
            final = self.out_dir / self.manifest.files[fi].path
            if not staged.exists() and any(i in self.done for i in self._pm.file_range(fi)):
                # Killed between rename and the row update, or staging removed: trust only what re-verifies.
                r = self._pm.file_range(fi)
                st._tx([("DELETE FROM pieces WHERE download_id=? AND idx>=? AND idx<?", (self.id, r.start, r.stop))])
                self.done -= set(r)
                if final.exists() and final.stat().st_size == self.manifest.files[fi].size:
                    self._adopt_final(fi, final)

    def _adopt_final(self, fi: int, final: Path) -> None:
        good = []
        for i in self._pm.file_range(fi):
            loc = PieceLocation(final, self._pm.pieces[i].offset, self._pm.pieces[i].length, self._pm.pieces[i].hash)
            try:
                data = _pread(loc)
            except OSError:  # a symlink planted at the final path (O_NOFOLLOW), or gone: fetch it again
                return
            if blake3.blake3(data).digest() == loc.hash:
                good.append(i)
        if len(good) == len(self._pm.file_range(fi)):
            self.store._tx([("INSERT OR IGNORE INTO pieces VALUES (?,?,?)", (self.id, i, self._pm.pieces[i].hash)) for i in good]
                           + [("INSERT OR REPLACE INTO files VALUES (?,?,1)", (self.id, fi))])
            self.done |= set(good)
            self.complete_files.add(fi)
            self._stamp(fi)

    def adopt(self, fi: int) -> bool:
        """Record a file already in place (written by another tool or run) if it passes :attr:`file_check`.

        Its pieces are hashed and recorded (learned where the manifest has no hash). Blocking.
        """
        f = self.manifest.files[fi]
        final = self.out_dir / f.path
        try:
            fd = os.open(final, os.O_RDONLY | os.O_NOFOLLOW)  # never adopt a link someone planted
        except OSError:
            return False
        try:
            if os.fstat(fd).st_size != f.size:
                return False
            if self.file_check is not None:
                try:
                    self.file_check(fi, fd)
                except IntegrityError:
                    return False
            rows = []
            for i in self._pm.file_range(fi):
                p = self._pm.pieces[i]
                h = blake3.blake3(os.pread(fd, p.length, p.offset)).digest()
                if p.hash != UNKNOWN_HASH and h != p.hash:
                    return False
                rows.append((i, h))
        finally:
            os.close(fd)
        self.store._tx([("INSERT OR REPLACE INTO pieces VALUES (?,?,?)", (self.id, i, h)) for i, h in rows]
                       + [("INSERT OR REPLACE INTO files VALUES (?,?,1)", (self.id, fi))])
        for i, h in rows:
            self.done.add(i)
            if self._pm.pieces[i].hash == UNKNOWN_HASH:
                self.learned[i] = h
        self.complete_files.add(fi)
        self._stamp(fi)
        if self.is_complete():
            self._mark_complete()
        return True

    # -- state ---------------------------------------------------------------
    def missing(self) -> list[int]:
        return [i for i in self.wanted if i not in self.done]

    def missing_bytes(self) -> int:
        return sum(self._pm.pieces[i].length for i in self.missing())

    @property
    def total_bytes(self) -> int:
        return sum(self._pm.pieces[i].length for i in self.wanted)

    def is_complete(self) -> bool:
        return all(fi in self.complete_files for fi in self.wanted_files)

    # -- writing -------------------------------------------------------------
    def _staging_dir_fd(self) -> int:
        """The staging directory, reached from OUT without following a symlink (kept open)."""
        with self._staging_lock:
            return self._open_staging_dir()

    def _open_staging_dir(self) -> int:
        if self._staging_fd is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            out_fd = os.open(self.out_dir, os.O_RDONLY | os.O_DIRECTORY)  # OUT itself is the user's choice
            try:
                part_fd = _open_dir(out_fd, PARTIAL_DIR, self.out_dir)
            finally:
                os.close(out_fd)
            try:
                self._staging_fd = _open_dir(part_fd, self.staging.name, self.staging.parent)
            finally:
                os.close(part_fd)
        return self._staging_fd

    def _fd(self, fi: int) -> int:
        with self._fd_lock:
            fd = self._fds.get(fi)
            if fd is not None:
                return fd
            try:
                fd = _open_file(self._staging_dir_fd(), f"{fi}.part", self.staging, create=True)
                size = self.manifest.files[fi].size
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)  # sparse: holes read as zeros and SEEK_DATA skips them
            except OSError as exc:
                _raise_os(exc, f"creating the staging file in {self.staging}")
            self._fds[fi] = fd
            return fd

    def write(self, index: int, offset_in_piece: int, data: bytes | bytearray | memoryview) -> None:
        """pwrite bytes of piece ``index`` at ``offset_in_piece`` (no hashing here)."""
        fi = self._pm.file_of[index]
        fd = self._fd(fi)
        pos = self._pm.pieces[index].offset + offset_in_piece
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(fd, view, pos)
                view = view[n:]
                pos += n
        except OSError as exc:
            _raise_os(exc, f"writing {self.manifest.files[fi].path}")
        with self._fd_lock:
            self._dirty.add(fi)

    def read(self, index: int) -> bytes:
        p = self._pm.pieces[index]
        fi = self._pm.file_of[index]
        path = self.out_dir / self.manifest.files[fi].path if fi in self.complete_files else self.staging / f"{fi}.part"
        return _pread(PieceLocation(path, p.offset, p.length, p.hash))

    def commit(self, indices: Iterable[int]) -> list[int]:
        """Make the pieces durable (fdatasync), record them, finish complete files.

        Returns the file indices that were completed and moved into place.
        """
        idx = [i for i in indices if i not in self.done]
        with self._fd_lock:
            dirty, self._dirty = self._dirty, set()
            fds = [self._fds[fi] for fi in dirty if fi in self._fds]
        for fd in fds:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                with self._fd_lock:
                    self._dirty |= dirty
                _raise_os(exc, "syncing the staging file")
        with self._fd_lock:
            for i in idx if self.drop_behind else ():  # clean now: see DROP_BEHIND
                pfd = self._fds.get(self._pm.file_of[i])
                if pfd is not None:
                    drop_cache(pfd, self._pm.pieces[i].offset, self._pm.pieces[i].length)
        if idx:
            self.store._tx([("INSERT OR IGNORE INTO pieces VALUES (?,?,?)", (self.id, i, self.piece_hash(i))) for i in idx])
            self.done.update(idx)
            with self._fd_lock:
                idents = {fi: os.fstat(fd) for fi, fd in self._fds.items()}
            self.store._written_here.update(
                ((self.manifest_id, i), (idents[fi].st_dev, idents[fi].st_ino))
                for i in idx if (fi := self._pm.file_of[i]) in idents
            )
        finished = []
        failed: IntegrityError | None = None
        for fi in sorted({self._pm.file_of[i] for i in idx}):
            if all(i in self.done for i in self._pm.file_range(fi)):
                try:
                    self._finish_file(fi)
                except IntegrityError as exc:  # the other files still finish; this one starts over
                    failed = failed or exc
                    continue
                finished.append(fi)
        if failed is not None:
            raise failed
        if self.is_complete():
            self._mark_complete()
        return finished

    def uncache(self, index: int) -> None:
        """Drop a committed piece's pages from the page cache (see :attr:`drop_behind`)."""
        with self._fd_lock:
            fd = self._fds.get(self._pm.file_of[index])
            if fd is not None:
                drop_cache(fd, self._pm.pieces[index].offset, self._pm.pieces[index].length)

    def piece_hash(self, index: int) -> bytes:
        """The piece's BLAKE3 hash: from the manifest, or learned on arrival (UNKNOWN_HASH until then)."""
        h = self._pm.pieces[index].hash
        return self.learned.get(index, h) if h == UNKNOWN_HASH else h

    def lock(self) -> None:
        """Take the per-download lock (a flock, released by the kernel even on kill -9).

        Two processes writing the same staging files could let one's unverified
        bytes land on the other's verified ones.
        """
        if self._lock_fd is not None:
            return
        try:
            fd = _open_file(self._staging_dir_fd(), ".lock", self.staging, create=True)
        except OSError as exc:
            _raise_os(exc, f"creating {self.staging}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StorageError(
                f"another fetch of {self.manifest.name} {self.manifest.version} into {self.out_dir} is running; "
                "wait for it or stop it first"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _mark_complete(self) -> None:
        self.store._q("UPDATE downloads SET completed=? WHERE id=?", (time.time(), self.id))
        if self._lock_fd is not None:
            try:
                (self.staging / ".lock").unlink()
            except OSError:
                pass
        for d in (self.staging, self.staging.parent):
            try:
                d.rmdir()  # only when empty: other downloads may share the parent
            except OSError:
                pass

    def _finish_file(self, fi: int) -> None:
        f = self.manifest.files[fi]
        with self._fd_lock:
            fd = self._fds.pop(fi, None)
        try:
            if fd is None:  # a file with no pieces (empty file), or opened earlier by another process
                self._fd(fi)
                with self._fd_lock:
                    fd = self._fds.pop(fi)
            os.fsync(fd)
            try:
                if self.file_check is not None:
                    self.file_check(fi, fd)
                if self.check_sha256 and _sha256_fd(fd, f.size) != f.sha256:
                    raise IntegrityError(f"{f.path}: every piece matched but the file's SHA-256 does not; the manifest is inconsistent")
            except IntegrityError as exc:
                self._discard_file(fi, fd)
                raise FileCheckFailed(str(exc), fi) from exc
            os.close(fd)
            self._rename_into_place(fi, f.path)
        except OSError as exc:
            _raise_os(exc, f"moving {f.path} into {self.out_dir}")
        self.store._q("INSERT OR REPLACE INTO files VALUES (?,?,1)", (self.id, fi))
        self.complete_files.add(fi)
        self._stamp(fi)

    def _rename_into_place(self, fi: int, rel: str) -> None:
        """Rename the staging file to OUT/rel between directory fds: no component may be a symlink.

        A symlink at OUT/rel itself is replaced (rename never follows it), so
        the result is always our regular file.
        """
        *parents, name = rel.split("/")
        dir_fd = os.open(self.out_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            where = self.out_dir
            for part in parents:
                sub = _open_dir(dir_fd, part, where)
                os.close(dir_fd)
                dir_fd, where = sub, where / part
            os.replace(f"{fi}.part", name, src_dir_fd=self._staging_dir_fd(), dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _discard_file(self, fi: int, fd: int) -> None:
        """Forget every piece of a file that failed its whole-file check, and its staged bytes."""
        r = self._pm.file_range(fi)
        self.store._tx([("DELETE FROM pieces WHERE download_id=? AND idx>=? AND idx<?", (self.id, r.start, r.stop))])
        self.done -= set(r)
        for i in r:
            self.learned.pop(i, None)
            self.partial.pop(i, None)
        # Unknown-hash pieces would be resumed from these bytes: punch them out.
        os.ftruncate(fd, 0)
        os.ftruncate(fd, self.manifest.files[fi].size)
        os.close(fd)

    def finish_empty_files(self) -> list[int]:
        """Files with no pieces (size 0) are complete as soon as the fetch starts."""
        out = []
        for fi in self.wanted_files:
            if fi not in self.complete_files and not self.manifest.files[fi].pieces:
                self._finish_file(fi)
                out.append(fi)
        if self.is_complete():
            self._mark_complete()
        return out

    def recover(self) -> list[int]:
        """Re-hash staged pieces that hold data but were never recorded (a crash before commit).

        Holes are skipped with SEEK_DATA, so a fresh sparse file costs nothing.
        """
        found = []
        for fi in self.wanted_files:
            if fi in self.complete_files:
                continue
            path = self.staging / f"{fi}.part"
            if not path.exists():
                continue
            fd = self._fd(fi)
            for i in self._pm.file_range(fi):
                if i in self.done:
                    continue
                p = self._pm.pieces[i]
                try:
                    has_data = os.lseek(fd, p.offset, os.SEEK_DATA) < p.end
                except OSError:
                    has_data = False  # ENXIO: no data after offset
                if has_data and blake3.blake3(os.pread(fd, p.length, p.offset)).digest() == p.hash:
                    found.append(i)
                    self._dirty.add(fi)
                elif has_data:
                    prefix = _data_prefix(fd, p.offset, p.length)
                    if prefix >= MIN_RESUME:
                        self.partial[i] = prefix
        return found

    # -- what is on disk is what the manifest says ---------------------------
    def _stamp(self, fi: int) -> None:
        """Record what finished file ``fi`` looks like now (it was just verified)."""
        try:
            st = (self.out_dir / self.manifest.files[fi].path).stat()
        except OSError:
            return  # the next check finds it missing
        self.store._q("INSERT OR REPLACE INTO file_stamps VALUES (?,?,?,?,?)", (self.id, fi, *_stamp_of(st)))

    def check_finished(self, full: bool = False) -> list[int]:
        """Re-check finished files before a fetch; returns the pieces that no longer match.

        Cheap by default: a file whose (size, mtime_ns, inode) equals its stamp
        is taken as written; any other is re-hashed piece by piece. ``full``
        re-hashes every finished file and checks its SHA-256 too. A file with
        bad pieces goes back to staging: its good pieces stay, the bad ones are
        fetched again, and the file is moved into place when whole. Call with
        the download's lock held (the engine does).
        """
        stamps = self.store._stamps(self.id)
        lost: list[int] = []
        for fi in sorted(self.complete_files & set(self.wanted_files)):
            f = self.manifest.files[fi]
            final = self.out_dir / f.path
            try:
                st = final.stat()
            except OSError:
                continue  # _load already forgot a missing file
            if not f.pieces or (not full and stamps.get(fi) == _stamp_of(st)):
                continue
            bad = self._rehash_final(fi, final, full)
            if bad:
                self._unfinish(fi, bad)
                lost += bad
            else:
                self._stamp(fi)
        return lost

    def _rehash_final(self, fi: int, final: Path, full: bool) -> list[int]:
        """Pieces of finished file ``fi`` whose bytes no longer match their hash."""
        f = self.manifest.files[fi]
        try:
            fd = os.open(final, os.O_RDONLY)
        except OSError as exc:
            _raise_os(exc, f"re-reading {f.path}")
        try:
            bad = []
            r = self._pm.file_range(fi)
            for i in r:
                p = self._pm.pieces[i]
                data = os.pread(fd, p.length, p.offset)
                drop_cache(fd, p.offset, p.length)
                if blake3.blake3(data).digest() != self.piece_hash(i):
                    bad.append(i)
            if bad and any(self._pm.pieces[i].hash == UNKNOWN_HASH for i in r):
                # Learned hashes (a hub file) vouch for nothing new: the whole
                # file is fetched again and checked whole (file_check).
                return list(r)
            if full and not bad and f.sha256 != bytes(32) and _sha256_fd(fd, f.size) != f.sha256:
                raise IntegrityError(f"{f.path}: every piece matches but the file's SHA-256 does not; the manifest is inconsistent")
            return bad
        finally:
            os.close(fd)

    def _unfinish(self, fi: int, bad: list[int]) -> None:
        """Move finished file ``fi`` back to staging and forget its ``bad`` pieces, so they are fetched again."""
        f = self.manifest.files[fi]
        try:
            if any(self._pm.pieces[i].hash == UNKNOWN_HASH for i in self._pm.file_range(fi)):
                # Staged bytes of unknown-hash pieces would be resumed from: start the file afresh.
                (self.out_dir / f.path).unlink()
            else:
                self.staging.mkdir(parents=True, exist_ok=True)
                os.replace(self.out_dir / f.path, self.staging / f"{fi}.part")
                _fsync_dir(self.staging)
        except OSError as exc:
            _raise_os(exc, f"moving {f.path} back to staging for repair")
        self.store._tx([
            *(("DELETE FROM pieces WHERE download_id=? AND idx=?", (self.id, i)) for i in bad),
            ("DELETE FROM files WHERE download_id=? AND file_index=?", (self.id, fi)),
            ("DELETE FROM file_stamps WHERE download_id=? AND file_index=?", (self.id, fi)),
            ("UPDATE downloads SET completed=NULL WHERE id=?", (self.id,)),
        ])
        self.complete_files.discard(fi)
        self.done -= set(bad)
        for i in bad:
            self.learned.pop(i, None)
        for i in self._pm.file_range(fi):
            self.store._written_here.pop((self.manifest_id, i), None)

    def discard_if_untouched(self) -> bool:
        """After a failed start: forget this download if it holds nothing verified and nothing staged.

        Removes its row, its staging directory and an output directory it
        created (when empty), so a failed fetch leaves no ghost in ``ls``.
        Leaves everything alone while another process holds the download.
        """
        self.close()  # idempotent: the fetch may have failed before it closed the download
        if self.done or self.complete_files or self.store._q("SELECT 1 FROM pieces WHERE download_id=? LIMIT 1", (self.id,)):
            return False
        if _in_use(self.staging) or _holds_data(self.staging):
            return False
        self.store._forget(self.id)
        _remove_staging(self.out_dir, self.staging)
        if not self._out_existed:
            try:
                self.out_dir.rmdir()
            except OSError:
                pass
        return True

    def read_range(self, index: int, start: int, length: int) -> bytes:
        """Bytes ``start:start+length`` of piece ``index`` from the staging file (unverified)."""
        p = self._pm.pieces[index]
        try:
            return os.pread(self._fd(self._pm.file_of[index]), length, p.offset + start)
        except OSError as exc:
            _raise_os(exc, "reading the staging file")

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            if self._staging_fd is not None:
                os.close(self._staging_fd)
                self._staging_fd = None
        self._unlock()


def preflight(download: Download, margin: int | None = None) -> None:
    """Refuse to start when the output or data directory is not writable or the disk is too small.

    Each refusal is one sentence that says what to do.
    """
    for d, flag in ((download.out_dir, "--out"), (download.store.data_dir, "--data-dir")):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {d} ({exc.strerror}); choose another {flag} or fix its permissions") from exc
        if not os.access(d, os.W_OK | os.X_OK):
            raise StorageError(f"cannot write to {d}; choose another {flag} or fix its permissions")
    need = download.missing_bytes()
    # Bytes already allocated in sparse staging files are not yet counted as used... they are, by
    # st_blocks; subtract them so a resume does not ask for space it already has.
    allocated = 0
    for fi in download.wanted_files:
        try:
            allocated += (download.staging / f"{fi}.part").stat().st_blocks * 512
        except OSError:
            pass
    if margin is None:
        margin = max(64 << 20, need // 100)
    st = os.statvfs(download.out_dir)
    free = st.f_bavail * st.f_frsize
    required = max(0, need - allocated) + margin
    if need and free < required:
        raise DiskFullError(
            f"not enough free space in {download.out_dir}: {_mib(required)} needed ({_mib(need)} still to fetch "
            f"plus a {_mib(margin)} margin) but {_mib(free)} free; free some space or choose another --out"
        )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
