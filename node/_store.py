"""The durable local store: which pieces are verified, where their bytes are, and serving them.

Strategy (why it survives ``kill -9`` at any instant):

* State lives in one SQLite database, ``DATA_DIR/store.sqlite``
  (``node/_storedb.py``: the schema, the connection, the statements). A row
  in ``pieces`` means "these bytes matched the manifest hash and were
  fdatasync'ed before the row was committed".
* Bytes are written in place (``os.pwrite``) into a sparse staging file per
  file, ``OUT/.autoglm-partial/<manifest id>/<file index>.part``
  (``node/_staging.py``). Keeping the staging area beside the destination
  makes the final ``rename`` atomic (same filesystem) and makes the
  free-space check look at the right disk.
* Group commit: writers hand verified pieces to :meth:`Download.commit`, which
  fdatasyncs every dirty staging file once and then records all those pieces
  in one transaction. A crash before the commit loses only those pieces'
  *record*; on the next open, :meth:`Download.recover` re-hashes the staging
  regions that hold data (``SEEK_DATA``) and re-records what still matches,
  so a killed process re-fetches only pieces that were partly received
  (``node/_ondisk.py``: resume, stamps of finished files, adoption).
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
  below OUT are opened relative to directory fds with ``O_NOFOLLOW``, a
  staging file must be a regular file with one link, a finished file is
  renamed between directory fds, and a piece written here is trusted for
  serving without a re-hash only while its file is still the inode we wrote
  (:meth:`Store.written_here`).

The store is blocking code; the engine calls it through ``trio.to_thread``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from autoglm.node._ondisk import UNKNOWN_HASH, OnDisk, stamp_problem
from autoglm.node._staging import (
    MIN_RESUME,
    PARTIAL_DIR,
    Staging,
    drop_cache,
    holds_data,
    in_use,
    pread_nofollow,
    raise_os,
    remove_staging,
    sha256_fd,
    staging_dir,
)
from autoglm.node._storedb import StoreDB, find_completed_download, find_download_at
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
    "drop_cache",
    "find_completed_download",
    "find_download_at",
    "preflight",
]

# Older private names, still imported by node/hub/_gateway.py (_staging_dir).
_staging_dir = staging_dir
_reexported = (MIN_RESUME,)


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
        self.db = StoreDB(data_dir)
        self._maps: dict[bytes, _PieceMap] = {}
        # (manifest id, piece) this process hash-checked, wrote and fdatasynced,
        # with the (device, inode) of the file written: uploads of these go out
        # by sendfile without a fresh hash check while that file is still there.
        self._written_here: dict[tuple[bytes, int], tuple[int, int]] = {}

    def note_written(self, manifest_id: bytes, pieces: Iterable[tuple[int, tuple[int, int]]]) -> None:
        """These pieces were verified, written and synced by this process, into the files (device, inode) given."""
        self._written_here.update(((manifest_id, i), ident) for i, ident in pieces)

    def forget_written(self, manifest_id: bytes, indices: Iterable[int]) -> None:
        """These pieces' files left our hands (moved back to staging for repair): re-hash before serving."""
        for i in indices:
            self._written_here.pop((manifest_id, i), None)

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
        self.db.close()

    def _map(self, manifest_id: bytes, signed_blob: bytes | None = None) -> _PieceMap:
        pm = self._maps.get(manifest_id)
        if pm is None:
            if signed_blob is None:
                rows = self.db.query("SELECT signed FROM downloads WHERE manifest_id=? LIMIT 1", (manifest_id,))
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
        self.db.query(
            "INSERT OR IGNORE INTO downloads (manifest_id, out_dir, name, version, signed, wanted, created) "
            "VALUES (?,?,?,?,?,?,?)",
            (mid, str(out_dir), m.name, m.version, blob, json.dumps(wanted), time.time()),
        )
        rows = self.db.query("SELECT id, wanted FROM downloads WHERE manifest_id=? AND out_dir=?", (mid, str(out_dir)))
        did = int(rows[0][0])
        old = json.loads(str(rows[0][1]))
        if old is not None and (wanted is None or set(wanted) - set(old)):
            merged = None if wanted is None else sorted(set(old) | set(wanted))
            self.db.query("UPDATE downloads SET wanted=?, completed=NULL WHERE id=?", (json.dumps(merged), did))
        return Download(self, did, mid, self._map(mid, blob), out_dir, wanted)

    def downloads(self) -> list[DownloadInfo]:
        out = []
        for did, mid, out_dir, name, version, completed, wanted in self.db.query(
            "SELECT id, manifest_id, out_dir, name, version, completed, wanted FROM downloads ORDER BY name, version"
        ):
            pm = self._map(mid)
            want = json.loads(str(wanted))
            idxs = [i for i in range(len(pm.pieces)) if want is None or pm.manifest.files[pm.file_of[i]].path in want]
            done = {int(r[0]) for r in self.db.query("SELECT idx FROM pieces WHERE download_id=?", (did,))}
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
        rows = self.db.query("SELECT id, wanted FROM downloads WHERE manifest_id=? AND out_dir=?", (info.manifest_id, str(info.out_dir)))
        if not rows:
            return info
        did, wanted = int(rows[0][0]), json.loads(str(rows[0][1]))
        pm = self._map(info.manifest_id)
        stamps = self.db.stamps(did)
        for fi, f in enumerate(pm.manifest.files):
            if wanted is not None and f.path not in wanted:
                continue
            problem = stamp_problem(info.out_dir / f.path, f.size, stamps.get(fi))
            if problem:
                return dataclasses.replace(info, completed=False, problem=f"{f.path} {problem}")
        return info

    # -- serving (used by the swarm) ----------------------------------------
    def _locations(self, manifest_id: bytes, index: int) -> Iterator[tuple[int, PieceLocation]]:
        pm = self._map(manifest_id)
        for did, out_dir, complete in self.db.query(
            "SELECT d.id, d.out_dir, f.complete FROM downloads d JOIN pieces p ON p.download_id=d.id "
            "LEFT JOIN files f ON f.download_id=d.id AND f.file_index=? WHERE d.manifest_id=? AND p.idx=?",
            (pm.file_of[index], manifest_id, index),
        ):
            yield int(did), _location(pm, Path(str(out_dir)), manifest_id, index, bool(complete))

    def verified_pieces(self, manifest_id: bytes) -> set[int]:
        """Indices (order of ``manifest.iter_pieces()``) of every verified piece, across downloads."""
        rows = self.db.query(
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
        return [r[0] for r in self.db.query("SELECT DISTINCT manifest_id FROM downloads WHERE substr(signed, 1, ?) = ?", (len(MAGIC), MAGIC))]

    def piece_location(self, manifest_id: bytes, index: int) -> PieceLocation:
        """Where a verified piece lies (for sendfile); the caller re-checks the hash (see node/_peerwire.py)."""
        for _, loc in self._locations(manifest_id, index):
            return loc
        raise StorageError(f"piece {index} of {manifest_id.hex()[:16]} is not verified here")

    def find_by_hash(self, piece_hash: bytes, exclude_download: int | None = None) -> PieceLocation | None:
        """A verified piece anywhere in the store with this BLAKE3 hash (for local copies)."""
        rows = self.db.query(
            "SELECT d.id, d.manifest_id, d.out_dir, p.idx FROM pieces p JOIN downloads d ON p.download_id=d.id "
            "WHERE p.hash=? AND d.id IS NOT ? LIMIT 4",
            (piece_hash, exclude_download),
        )
        for did, mid, out_dir, idx in rows:
            pm = self._map(mid)
            fi = pm.file_of[int(idx)]
            c = self.db.query("SELECT complete FROM files WHERE download_id=? AND file_index=?", (did, fi))
            loc = _location(pm, Path(str(out_dir)), mid, int(idx), bool(c and c[0][0]))
            if loc.path.exists():
                return loc
        return None

    # -- gc ------------------------------------------------------------------
    def _gc_unfinished(self, drop_incomplete: bool) -> list[str]:
        """Unfinished downloads: forget those that hold nothing (a failed start), and with
        ``drop_incomplete`` every one, with the finished files it put in place and its staging.

        A finished file is removed only while it is still the one the store
        wrote (its stamp matches); anything else in the output directory stays.
        """
        done: list[str] = []
        rows = self.db.query("SELECT id, manifest_id, out_dir FROM downloads WHERE completed IS NULL")
        for did, mid, out_dir in rows:
            did, od = int(did), Path(str(out_dir))
            staging = staging_dir(od, bytes(mid))
            m = self._map(mid).manifest
            if in_use(staging):
                continue  # the main pass reports it
            pieces = self.db.query("SELECT 1 FROM pieces WHERE download_id=? LIMIT 1", (did,))
            finished = [int(r[0]) for r in self.db.query("SELECT file_index FROM files WHERE download_id=? AND complete=1", (did,))]
            if not drop_incomplete and (pieces or finished or holds_data(staging)):
                continue
            stamps = self.db.stamps(did)
            removed, kept = 0, []
            for fi in finished:
                path = od / m.files[fi].path
                if fi in stamps and stamp_problem(path, m.files[fi].size, stamps[fi]) is None:
                    path.unlink()
                    removed += 1
                elif path.exists():
                    kept.append(m.files[fi].path)
            self.db.forget(did)
            remove_staging(od, staging)
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
        for did, mid, out_dir, completed in self.db.query("SELECT id, manifest_id, out_dir, completed FROM downloads"):
            od = Path(str(out_dir))
            out_dirs.add(od)
            staging = od / PARTIAL_DIR / bytes(mid).hex()[:32]
            pm = self._map(mid)
            complete_files = {int(r[0]) for r in self.db.query("SELECT file_index FROM files WHERE download_id=? AND complete=1", (did,))}
            gone = [fi for fi in complete_files if not (od / pm.manifest.files[fi].path).exists()]
            if in_use(staging):
                known.add(staging)
                done.append(f"skipped {pm.manifest.name} {pm.manifest.version} in {od}: a fetch is running")
                continue
            if not od.exists() or (completed is None and drop_incomplete) or (gone and len(gone) == len(complete_files) and completed is not None):
                self.db.transaction([("DELETE FROM pieces WHERE download_id=?", (did,)), ("DELETE FROM files WHERE download_id=?", (did,)),
                          ("DELETE FROM downloads WHERE id=?", (did,))])
                done.append(f"forgot {pm.manifest.name} {pm.manifest.version} in {od}")
                continue
            for fi in gone:
                r = pm.file_range(fi)
                self.db.transaction([("DELETE FROM pieces WHERE download_id=? AND idx>=? AND idx<?", (did, r.start, r.stop)),
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
                if d not in known and not in_use(d):
                    shutil.rmtree(d, ignore_errors=True)
                    done.append(f"removed stale staging {d}")
            if not any(part.iterdir()):
                part.rmdir()
        return done


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


def _location(pm: _PieceMap, out_dir: Path, manifest_id: bytes, index: int, complete: bool) -> PieceLocation:
    fi = pm.file_of[index]
    p = pm.pieces[index]
    path = out_dir / pm.manifest.files[fi].path if complete else staging_dir(out_dir, manifest_id) / f"{fi}.part"
    return PieceLocation(path, p.offset, p.length, p.hash)


class Download:
    """One manifest being assembled into one output directory. Blocking; use from a worker thread.

    Its parts: :class:`~autoglm.node._staging.Staging` (the staging files),
    :class:`~autoglm.node._ondisk.OnDisk` (resume, stamps, adoption); the
    download itself keeps the state (done, complete files, learned hashes)
    and finalises: commit, whole-file check, rename into place.
    """

    def __init__(self, store: Store, did: int, manifest_id: bytes, pm: _PieceMap, out_dir: Path, wanted: list[str] | None) -> None:
        self.store = store
        self.id = did
        self.manifest_id = manifest_id
        self.manifest = pm.manifest
        self._pm = pm
        self.out_dir = out_dir
        self.staging = staging_dir(out_dir, manifest_id)
        self.staging_files = Staging(out_dir, manifest_id, [f.size for f in self.manifest.files])
        want = None if wanted is None else set(wanted)
        self.wanted_files = [fi for fi, f in enumerate(self.manifest.files) if want is None or f.path in want]
        self.wanted = [i for fi in self.wanted_files for i in pm.file_range(fi)]
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
        self._disk = OnDisk(self)
        self._disk.load()

    @property
    def pieces(self) -> list[Piece]:
        return self._pm.pieces

    @property
    def file_of(self) -> list[int]:
        return self._pm.file_of

    @property
    def file_starts(self) -> list[int]:
        return self._pm.file_starts

    def file_range(self, fi: int) -> range:
        """The global piece indices of file ``fi``."""
        return self._pm.file_range(fi)

    def adopt(self, fi: int) -> bool:
        """Record a file already in place (written by another tool or run) if it passes :attr:`file_check`.

        Its pieces are hashed and recorded (learned where the manifest has no hash). Blocking.
        """
        if not self._disk.adopt(fi):
            return False
        if self.is_complete():
            self._mark_complete()
        return True

    def recover(self) -> list[int]:
        """Re-hash staged pieces that hold data but were never recorded (a crash before commit)."""
        return self._disk.recover()

    def check_finished(self, full: bool = False) -> list[int]:
        """Re-check finished files before a fetch; returns the pieces that no longer match (see ``OnDisk``)."""
        return self._disk.check_finished(full)

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

    def piece_hash(self, index: int) -> bytes:
        """The piece's BLAKE3 hash: from the manifest, or learned on arrival (UNKNOWN_HASH until then)."""
        h = self._pm.pieces[index].hash
        return self.learned.get(index, h) if h == UNKNOWN_HASH else h

    # -- writing -------------------------------------------------------------
    def write(self, index: int, offset_in_piece: int, data: bytes | bytearray | memoryview) -> None:
        """pwrite bytes of piece ``index`` at ``offset_in_piece`` (no hashing here)."""
        fi = self._pm.file_of[index]
        self.staging_files.write(fi, self._pm.pieces[index].offset + offset_in_piece, data, self.manifest.files[fi].path,
                                 direct=self.drop_behind)  # a caller that reads the pieces back wants them cached

    def read(self, index: int) -> bytes:
        p = self._pm.pieces[index]
        fi = self._pm.file_of[index]
        path = self.out_dir / self.manifest.files[fi].path if fi in self.complete_files else self.staging / f"{fi}.part"
        return pread_nofollow(path, p.offset, p.length)

    def read_range(self, index: int, start: int, length: int) -> bytes:
        """Bytes ``start:start+length`` of piece ``index`` from the staging file (unverified)."""
        return self.staging_files.pread(self._pm.file_of[index], length, self._pm.pieces[index].offset + start)

    def commit(self, indices: Iterable[int]) -> list[int]:
        """Make the pieces durable (fdatasync), record them, finish complete files.

        Returns the file indices that were completed and moved into place.
        """
        idx = [i for i in indices if i not in self.done]
        self.staging_files.sync()
        for i in idx if self.drop_behind else ():  # clean now: see DROP_BEHIND
            self.uncache(i)
        if idx:
            self.store.db.transaction([("INSERT OR IGNORE INTO pieces VALUES (?,?,?)", (self.id, i, self.piece_hash(i))) for i in idx])
            self.done.update(idx)
            idents = self.staging_files.idents()
            self.store.note_written(self.manifest_id, ((i, idents[fi]) for i in idx if (fi := self._pm.file_of[i]) in idents))
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
        p = self._pm.pieces[index]
        self.staging_files.drop(self._pm.file_of[index], p.offset, p.length)

    def lock(self) -> None:
        """Take the per-download lock (a flock, released by the kernel even on kill -9).

        Two processes writing the same staging files could let one's unverified
        bytes land on the other's verified ones.
        """
        if not self.staging_files.lock():
            raise StorageError(
                f"another fetch of {self.manifest.name} {self.manifest.version} into {self.out_dir} is running; "
                "wait for it or stop it first"
            )

    # -- finalising ------------------------------------------------------------
    def _mark_complete(self) -> None:
        self.store.db.query("UPDATE downloads SET completed=? WHERE id=?", (time.time(), self.id))
        self.staging_files.remove_if_done()

    def _finish_file(self, fi: int) -> None:
        f = self.manifest.files[fi]
        try:
            fd = self.staging_files.take(fi)  # a file with no pieces (empty file) is created here
            os.fsync(fd)
            try:
                if self.file_check is not None:
                    self.file_check(fi, fd)
                if self.check_sha256 and sha256_fd(fd, f.size) != f.sha256:
                    raise IntegrityError(f"{f.path}: every piece matched but the file's SHA-256 does not; the manifest is inconsistent")
            except IntegrityError as exc:
                self._discard_file(fi, fd)
                raise FileCheckFailed(str(exc), fi) from exc
            os.close(fd)
            self.staging_files.rename_into_place(fi, f.path)
        except OSError as exc:
            raise_os(exc, f"moving {f.path} into {self.out_dir}")
        self.store.db.query("INSERT OR REPLACE INTO files VALUES (?,?,1)", (self.id, fi))
        self.complete_files.add(fi)
        self._disk.stamp(fi)

    def _discard_file(self, fi: int, fd: int) -> None:
        """Forget every piece of a file that failed its whole-file check, and its staged bytes."""
        r = self._pm.file_range(fi)
        self.store.db.transaction([("DELETE FROM pieces WHERE download_id=? AND idx>=? AND idx<?", (self.id, r.start, r.stop))])
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

    def discard_if_untouched(self) -> bool:
        """After a failed start: forget this download if it holds nothing verified and nothing staged.

        Removes its row, its staging directory and an output directory it
        created (when empty), so a failed fetch leaves no ghost in ``ls``.
        Leaves everything alone while another process holds the download.
        """
        self.close()  # idempotent: the fetch may have failed before it closed the download
        if self.done or self.complete_files or self.store.db.has_pieces(self.id):
            return False
        if in_use(self.staging) or holds_data(self.staging):
            return False
        self.store.db.forget(self.id)
        remove_staging(self.out_dir, self.staging)
        if not self._out_existed:
            try:
                self.out_dir.rmdir()
            except OSError:
                pass
        return True

    def close(self) -> None:
        self.staging_files.close()


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
