"""Host costs behind two node settings: drop-behind page cache and glibc malloc thresholds.

Prints one table; every row is CPU seconds (user + system) of this process,
measured with ``time.process_time`` in one run.

  1. write SIZE in 8 MiB pwrites, page cache kept (the kernel's default)
  2. the same with fdatasync + POSIX_FADV_DONTNEED after each 8 MiB (what the store does)
  3. read it back cold with sendfile into a socket, dropping behind (what peerwire does): into a
     socketpair read by a thread (both counted), and into loopback TCP read by another process
     (the sender alone)
  4. fill 256 fresh 8 MiB bytearrays, glibc defaults (each one a new mmap)
  5. the same after node/_malloc.tune() (freed buffers stay in the heap)

Rows 4 and 5 run in child processes so that each starts with its own allocator.

    .venv/bin/python bench/host_costs.py [--size 4GiB] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import print_table

PIECE = 8 << 20

_FILL = """
import os, sys, time
if sys.argv[1] == "tuned":
    from autoglm.node._malloc import tune
    assert tune()
src = os.urandom(8 << 20)
t = time.process_time()
for _ in range(256):
    b = bytearray(8 << 20)
    b[:] = src
    del b
print(time.process_time() - t)
"""


def _size(text: str) -> int:
    units = {"GiB": 1 << 30, "MiB": 1 << 20}
    for u, m in units.items():
        if text.endswith(u):
            return int(float(text[: -len(u)]) * m)
    return int(text)


def _write(path: Path, total: int, drop: bool) -> float:
    buf = os.urandom(PIECE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, total)
        t = time.process_time()
        for off in range(0, total, PIECE):
            os.pwrite(fd, buf, off)
            if drop:
                os.fdatasync(fd)
                os.posix_fadvise(fd, off, PIECE, os.POSIX_FADV_DONTNEED)
        if not drop:
            os.fdatasync(fd)
        return time.process_time() - t
    finally:
        os.close(fd)


def _sendfile_cold(path: Path, total: int) -> tuple[float, float]:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, total, os.POSIX_FADV_DONTNEED)
    a, b = socket.socketpair()

    def sink() -> None:
        n = 0
        while n < total:
            r = b.recv(1 << 20)
            if not r:
                return
            n += len(r)

    th = threading.Thread(target=sink)
    th.start()
    t, w = time.process_time(), time.perf_counter()
    for off in range(0, total, PIECE):
        sent = 0
        while sent < PIECE:
            sent += os.sendfile(a.fileno(), fd, off + sent, PIECE - sent)
        os.posix_fadvise(fd, off, PIECE, os.POSIX_FADV_DONTNEED)
    th.join()
    cpu, wall = time.process_time() - t, time.perf_counter() - w
    a.close()
    b.close()
    os.close(fd)
    return cpu, wall


def _sendfile_tcp(path: Path, total: int) -> float:
    """CPU of the sending process alone: sendfile cold, drop-behind, into loopback TCP read by another process.

    The socketpair row above counts its reading thread too, and a Unix socket
    skips TCP; over loopback TCP the sender's system time also carries the
    kernel's receive-side processing (it runs in the sending thread's
    context), which the peerwire server pays as well.
    """
    srv = socket.create_server(("127.0.0.1", 0))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: read and discard
        try:
            with socket.create_connection(srv.getsockname()) as c:
                buf = bytearray(1 << 20)
                while c.recv_into(buf):
                    pass
        finally:
            os._exit(0)
    conn, _ = srv.accept()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, total, os.POSIX_FADV_DONTNEED)
        t = time.process_time()
        for off in range(0, total, PIECE):
            sent = 0
            while sent < PIECE:
                sent += os.sendfile(conn.fileno(), fd, off + sent, PIECE - sent)
            os.posix_fadvise(fd, off, PIECE, os.POSIX_FADV_DONTNEED)
        return time.process_time() - t
    finally:
        os.close(fd)
        conn.close()
        srv.close()
        os.waitpid(pid, 0)


def _fill(mode: str) -> float:
    r = subprocess.run([sys.executable, "-c", _FILL, mode], capture_output=True, text=True, check=True, timeout=300)
    return float(r.stdout.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4GiB")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    total = _size(args.size)
    gib = total / (1 << 30)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "host-costs.bin"
        kept = _write(path, total, drop=False)
        path.unlink()
        time.sleep(2)
        dropped = _write(path, total, drop=True)
        cpu, wall = _sendfile_cold(path, total)
        tcp = _sendfile_tcp(path, total)
    rows.append(["pwrite, page cache kept", f"{kept:.2f}", f"{kept / gib:.2f}"])
    rows.append(["pwrite + fdatasync + DONTNEED per 8 MiB", f"{dropped:.2f}", f"{dropped / gib:.2f}"])
    rows.append([f"sendfile cold, drop-behind ({total / wall / 1e9:.2f} GB/s)", f"{cpu:.2f}", f"{cpu / gib:.2f}"])
    rows.append(["sendfile cold, drop-behind, loopback TCP (sender only)", f"{tcp:.2f}", f"{tcp / gib:.2f}"])
    plain, tuned = _fill("plain"), _fill("tuned")
    rows.append(["256 fresh 8 MiB bytearrays, glibc defaults", f"{plain:.2f}", f"{plain / 2:.2f}"])
    rows.append(["the same after node/_malloc.tune()", f"{tuned:.2f}", f"{tuned / 2:.2f}"])
    print_table(f"Host costs ({args.size} file in {args.dir}; 2 GiB of buffers)", ["case", "CPU s", "CPU s / GiB"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
