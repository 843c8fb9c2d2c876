"""The store's database: the schema, the one connection, and the statements that change it.

``DATA_DIR/store.sqlite`` (WAL, ``synchronous=FULL``): ``downloads`` (one
row per manifest and output directory), ``files`` (finished files),
``pieces`` (a row means "these bytes matched the manifest hash and were
fdatasync'ed before the row was committed"; indexed by hash for local
copies) and ``file_stamps`` (what a finished file looked like when it was
moved into place). :class:`StoreDB` is thread-safe: one lock serialises the
connection. The read-only look-ups for the load gate
(:func:`find_completed_download`, :func:`find_download_at`) open no
:class:`StoreDB`: the gate must not change a data directory it reads.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from autoglm.node.errors import DiskFullError, StorageError
from autoglm.protocol._signing import MAGIC

__all__ = ["SCHEMA", "STAMP_SCHEMA", "StoreDB", "find_completed_download", "find_download_at"]

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

Statement = tuple[str, tuple[object, ...]]


class StoreDB:
    """The open ``store.sqlite`` of one data directory. Thread-safe; blocking."""

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

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _translate(self, exc: sqlite3.OperationalError) -> StorageError:
        if "full" in str(exc):
            return DiskFullError(f"the disk holding {self.data_dir} is full; free some space and run again")
        return StorageError(f"store database: {exc}")

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement in its own transaction; its rows."""
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as exc:
                raise self._translate(exc) from exc

    def transaction(self, statements: Iterable[Statement]) -> None:
        """Every statement in one transaction: all or none."""
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
                raise self._translate(exc) from exc

    # -- statements used in more than one place ---------------------------------
    def stamps(self, download_id: int) -> dict[int, tuple[int, int, int]]:
        """file index -> (size, mtime_ns, inode) of each finished file when it was moved into place."""
        rows = self.query("SELECT file_index, size, mtime_ns, ino FROM file_stamps WHERE download_id=?", (download_id,))
        return {int(fi): (int(a), int(b), int(c)) for fi, a, b, c in rows}

    def set_stamp(self, download_id: int, file_index: int, stamp: tuple[int, int, int]) -> None:
        self.query("INSERT OR REPLACE INTO file_stamps VALUES (?,?,?,?,?)", (download_id, file_index, *stamp))

    def complete_files(self, download_id: int) -> set[int]:
        return {int(r[0]) for r in self.query("SELECT file_index FROM files WHERE download_id=? AND complete=1", (download_id,))}

    def has_pieces(self, download_id: int) -> bool:
        return bool(self.query("SELECT 1 FROM pieces WHERE download_id=? LIMIT 1", (download_id,)))

    def forget(self, download_id: int) -> None:
        """Delete a download and everything recorded for it."""
        self.transaction([("DELETE FROM pieces WHERE download_id=?", (download_id,)),
                          ("DELETE FROM files WHERE download_id=?", (download_id,)),
                          ("DELETE FROM file_stamps WHERE download_id=?", (download_id,)),
                          ("DELETE FROM downloads WHERE id=?", (download_id,))])


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
