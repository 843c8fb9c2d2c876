"""Staging files: where a download's bytes are written before their file is final.

One sparse file per manifest file, ``OUT/.autoglm-partial/<manifest id>/<file
index>.part``, written in place with ``os.pwrite``. Beside the destination,
so the final ``rename`` is atomic (same filesystem) and the free-space check
looks at the right disk. Nothing in OUT is trusted to be what we left there:
every directory below OUT is opened relative to a directory fd with
``O_NOFOLLOW`` (:func:`open_dir`), a staging file must be a regular file with
one link (:func:`open_file`), and a finished file is renamed between
directory fds. A flock on ``.lock`` keeps two processes off the same files.

Also here: drop-behind (:func:`drop_cache`), and the small helpers the store
and gc share for staging directories (:func:`in_use`, :func:`holds_data`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import NoReturn

from autoglm.node.errors import DiskFullError, StorageError

__all__ = [
    "DROP_BEHIND",
    "MIN_RESUME",
    "PARTIAL_DIR",
    "Staging",
    "data_prefix",
    "drop_cache",
    "holds_data",
    "in_use",
    "open_dir",
    "open_file",
    "pread_nofollow",
    "raise_os",
    "remove_staging",
    "sha256_fd",
    "staging_dir",
]

PARTIAL_DIR = ".autoglm-partial"
#: A crash left at least this many bytes of a piece staged: a mirror resumes after them.
MIN_RESUME = 16 << 10

# Drop-behind: once a piece is durable (fdatasync) or has been read for
# hashing or upload, its page-cache pages are handed back at once. A model is
# written once and read a few times, so caching it evicts the host's working
# set for nothing; and fresh page-cache pages are expensive: on the development
# VM, pwrite of 4 GiB cost 7.7 CPU-s with the pages kept and 1.2 CPU-s with
# fdatasync + POSIX_FADV_DONTNEED per 8 MiB, and a cold re-read by sendfile
# runs at ~2 GB/s (docs/benchmarks.md). AUTOGLM_KEEP_PAGE_CACHE=1 turns it off.
DROP_BEHIND = os.environ.get("AUTOGLM_KEEP_PAGE_CACHE", "0") != "1"

# Direct I/O for big writes: the block-aligned middle of a write of at least
# DIRECT_MIN bytes goes to the disk with O_DIRECT, through a second fd on the
# same staging file, and skips the page cache altogether: no page allocated,
# filled, written back and dropped again. On the development VM, 8 MiB pieces
# cost 0.39-0.42 CPU-s per GiB with pwrite + fdatasync + DONTNEED, 0.08-0.09
# with O_DIRECT + fdatasync, and 0.20 when each piece is first copied into an
# aligned buffer (as here, unless the caller's buffer happens to be aligned).
# Durability is unchanged: a commit still fdatasyncs the file (the extents a
# direct write allocated, the device's cache) before it records a piece. The
# unaligned head and tail of a write go through the page cache; the kernel
# keeps both paths coherent. A filesystem that refuses O_DIRECT (tmpfs on old
# kernels, some FUSE) gets buffered writes. AUTOGLM_DIRECT_IO=0 turns it off;
# so does AUTOGLM_KEEP_PAGE_CACHE=1 (a caller that wants the pages cached).
DIRECT_IO = DROP_BEHIND and os.environ.get("AUTOGLM_DIRECT_IO", "1") != "0" and hasattr(os, "O_DIRECT")
DIRECT_ALIGN = 4096  # offset, length and memory alignment; covers 512-byte and 4Kn devices
DIRECT_MIN = 1 << 20
_BOUNCE = 4 << 20  # the aligned buffer of a worker thread, reused
_bounce = threading.local()


def drop_cache(fd: int, offset: int, length: int) -> None:
    """Advise the kernel to drop clean cached pages of this range (no-op when disabled)."""
    if DROP_BEHIND and length > 0:
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):  # advice only; some filesystems / platforms refuse
            pass


def raise_os(exc: OSError, what: str) -> NoReturn:
    """An OSError as the store's error: DiskFullError for a full disk or quota, else StorageError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(
            f"the disk is full while {what}; free some space and run the same command again "
            "(every verified piece is kept)"
        ) from exc
    raise StorageError(f"{what}: {exc.strerror or exc}") from exc


def staging_dir(out_dir: Path, manifest_id: bytes) -> Path:
    return out_dir / PARTIAL_DIR / manifest_id.hex()[:32]


def pread_nofollow(path: Path, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of ``path`` (never through a symlink), then dropped from the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        data = os.pread(fd, length, offset)
        drop_cache(fd, offset, length)
        return data
    finally:
        os.close(fd)


def data_prefix(fd: int, offset: int, length: int) -> int:
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


def has_data(fd: int, offset: int, end: int) -> bool:
    """Whether any byte in ``offset:end`` is data, not a hole (SEEK_DATA)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) < end
    except OSError:
        return False  # ENXIO: no data after offset


def sha256_fd(fd: int, size: int) -> bytes:
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


def open_dir(parent_fd: int, name: str, where: Path, create: bool = True) -> int:
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


def open_file(dir_fd: int, name: str, where: Path, create: bool) -> int:
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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def in_use(staging: Path) -> bool:
    """Whether a running fetch holds this staging directory's lock."""
    return is_locked(staging / ".lock")


def is_locked(lock_file: Path) -> bool:
    """Whether another process holds an exclusive flock on ``lock_file`` (a missing file: no)."""
    try:
        fd = os.open(lock_file, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def holds_data(staging: Path) -> bool:
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


def remove_staging(out_dir: Path, staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (out_dir / PARTIAL_DIR).rmdir()  # only when empty: other downloads may share it
    except OSError:
        pass


def _pwrite_all(fd: int, view: memoryview, pos: int) -> None:
    while view:
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n


def _aligned(view: memoryview) -> bool:
    """Whether a writable buffer starts on a DIRECT_ALIGN boundary (a read-only one: unknown, so no)."""
    if view.readonly or not view.c_contiguous:
        return False
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGN == 0


def _bounce_buffer() -> memoryview:
    buf: memoryview | None = getattr(_bounce, "view", None)
    if buf is None:
        import mmap

        buf = _bounce.view = memoryview(mmap.mmap(-1, _BOUNCE))  # page-aligned
    return buf


class Staging:
    """The staging files of one download, their open fds and which need an fdatasync. Thread-safe; blocking."""

    def __init__(self, out_dir: Path, manifest_id: bytes, sizes: list[int]) -> None:
        self.out_dir = out_dir
        self.path = staging_dir(out_dir, manifest_id)
        self._sizes = sizes
        self._fds: dict[int, int] = {}
        self._direct: dict[int, int | None] = {}  # O_DIRECT fd per file; None: cannot be opened there
        self._no_direct: set[int] = set()  # files where a direct write was refused (EINVAL)
        self._dirty: set[int] = set()
        self._fd_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._dir_fd: int | None = None
        self._dir_lock = threading.Lock()

    def exists(self, fi: int) -> bool:
        return (self.path / f"{fi}.part").exists()

    def dir_fd(self) -> int:
        """The staging directory, reached from OUT without following a symlink (kept open)."""
        with self._dir_lock:
            if self._dir_fd is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                out_fd = os.open(self.out_dir, os.O_RDONLY | os.O_DIRECTORY)  # OUT itself is the user's choice
                try:
                    part_fd = open_dir(out_fd, PARTIAL_DIR, self.out_dir)
                finally:
                    os.close(out_fd)
                try:
                    self._dir_fd = open_dir(part_fd, self.path.name, self.path.parent)
                finally:
                    os.close(part_fd)
            return self._dir_fd

    def fd(self, fi: int) -> int:
        """The open staging file of file ``fi``, created sparse at its full size."""
        with self._fd_lock:
            fd = self._fds.get(fi)
            if fd is not None:
                return fd
            try:
                fd = open_file(self.dir_fd(), f"{fi}.part", self.path, create=True)
                if os.fstat(fd).st_size != self._sizes[fi]:
                    os.ftruncate(fd, self._sizes[fi])  # sparse: holes read as zeros and SEEK_DATA skips them
            except OSError as exc:
                raise_os(exc, f"creating the staging file in {self.path}")
            self._fds[fi] = fd
            return fd

    def take(self, fi: int) -> int:
        """The staging file's fd, no longer kept here (to finish the file): the caller closes it."""
        self.fd(fi)
        with self._fd_lock:
            dfd = self._direct.pop(fi, None)
            if dfd is not None:
                os.close(dfd)
            return self._fds.pop(fi)

    def _direct_fd(self, fi: int, fd: int) -> int | None:
        """A second fd on the same staging file, opened with O_DIRECT; None where the filesystem refuses it."""
        with self._fd_lock:
            if fi in self._no_direct:
                return None
            if fi in self._direct:
                return self._direct[fi]
            dfd: int | None = None
            try:
                # The open file itself, reopened (no path in OUT is followed again).
                dfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
                a, b = os.fstat(fd), os.fstat(dfd)
                if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                    os.close(dfd)
                    dfd = None
            except OSError:
                dfd = None
            self._direct[fi] = dfd
            return dfd

    def _refuse_direct(self, fi: int) -> None:
        # The fd stays open until take() or close(): another thread may be writing through it now.
        with self._fd_lock:
            self._no_direct.add(fi)

    def write(self, fi: int, pos: int, data: bytes | bytearray | memoryview, what: str, *, direct: bool = True) -> None:
        """pwrite ``data`` at ``pos`` of file ``fi``'s staging file (see DIRECT_IO; ``direct=False``: never)."""
        fd = self.fd(fi)
        view = memoryview(data).cast("B")
        try:
            if direct and DIRECT_IO and len(view) >= DIRECT_MIN:
                a = -(-pos // DIRECT_ALIGN) * DIRECT_ALIGN
                b = (pos + len(view)) // DIRECT_ALIGN * DIRECT_ALIGN
                if b - a >= DIRECT_MIN and self._write_direct(fi, fd, view[a - pos : b - pos], a):
                    _pwrite_all(fd, view[: a - pos], pos)
                    _pwrite_all(fd, view[b - pos :], b)
                    self.mark_dirty(fi)
                    return
            _pwrite_all(fd, view, pos)
        except OSError as exc:
            raise_os(exc, f"writing {what}")
        self.mark_dirty(fi)

    def _write_direct(self, fi: int, fd: int, view: memoryview, pos: int) -> bool:
        """Write an aligned range with O_DIRECT; False (nothing promised written) where the filesystem refuses it."""
        dfd = self._direct_fd(fi, fd)
        if dfd is None:
            return False
        zero_copy = _aligned(view)
        bounce = None if zero_copy else _bounce_buffer()
        try:
            while view:
                if bounce is None:
                    chunk = view
                else:
                    chunk = bounce[: min(len(bounce), len(view))]
                    chunk[:] = view[: len(chunk)]
                n = os.pwrite(dfd, chunk, pos)
                if n < len(chunk):  # a short direct write: the rest of this chunk through the page cache
                    _pwrite_all(fd, view[n : len(chunk)], pos + n)
                view = view[len(chunk) :]
                pos += len(chunk)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._refuse_direct(fi)  # alignment or O_DIRECT itself refused here: buffered from now on
            return False
        return True

    def mark_dirty(self, fi: int) -> None:
        with self._fd_lock:
            self._dirty.add(fi)

    def pread(self, fi: int, length: int, pos: int) -> bytes:
        try:
            return os.pread(self.fd(fi), length, pos)
        except OSError as exc:
            raise_os(exc, "reading the staging file")

    def sync(self) -> None:
        """fdatasync every staging file written since the last sync."""
        with self._fd_lock:
            dirty, self._dirty = self._dirty, set()
            fds = [self._fds[fi] for fi in dirty if fi in self._fds]
        for fd in fds:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                with self._fd_lock:
                    self._dirty |= dirty
                raise_os(exc, "syncing the staging file")

    def drop(self, fi: int, offset: int, length: int) -> None:
        """Drop a range of an open staging file from the page cache (see :data:`DROP_BEHIND`)."""
        with self._fd_lock:
            fd = self._fds.get(fi)
            if fd is not None:
                drop_cache(fd, offset, length)

    def idents(self) -> dict[int, tuple[int, int]]:
        """(device, inode) of each open staging file."""
        with self._fd_lock:
            return {fi: ((st := os.fstat(fd)).st_dev, st.st_ino) for fi, fd in self._fds.items()}

    def lock(self) -> bool:
        """Take the flock on ``.lock`` (released by the kernel even on kill -9); False when another process holds it."""
        if self._lock_fd is not None:
            return True
        try:
            fd = open_file(self.dir_fd(), ".lock", self.path, create=True)
        except OSError as exc:
            raise_os(exc, f"creating {self.path}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def remove_if_done(self) -> None:
        """The download is complete: remove the lock file and the staging directories that are now empty."""
        if self._lock_fd is not None:
            try:
                (self.path / ".lock").unlink()
            except OSError:
                pass
        for d in (self.path, self.path.parent):
            try:
                d.rmdir()  # only when empty: other downloads may share the parent
            except OSError:
                pass

    def rename_into_place(self, fi: int, rel: str) -> None:
        """Rename the staging file to OUT/rel between directory fds: no component may be a symlink.

        A symlink at OUT/rel itself is replaced (rename never follows it), so
        the result is always our regular file.
        """
        *parents, name = rel.split("/")
        dir_fd = os.open(self.out_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            where = self.out_dir
            for part in parents:
                sub = open_dir(dir_fd, part, where)
                os.close(dir_fd)
                dir_fd, where = sub, where / part
            os.replace(f"{fi}.part", name, src_dir_fd=self.dir_fd(), dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        """Close every fd and release the lock."""
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            for dfd in self._direct.values():
                if dfd is not None:
                    os.close(dfd)
            self._direct.clear()
            if self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
