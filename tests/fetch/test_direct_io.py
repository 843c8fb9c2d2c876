"""Direct I/O in the staging files (node/_staging.py, DIRECT_IO): the bytes land where they belong, whatever the alignment."""

from __future__ import annotations

import mmap
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoglm.node import _staging
from autoglm.node._staging import DIRECT_ALIGN, DIRECT_MIN, Staging
from autoglm.node.errors import DiskFullError

MIB = 1 << 20
SIZE = 12 * MIB

pytestmark = pytest.mark.skipif(not _staging.DIRECT_IO, reason="direct I/O is off (AUTOGLM_DIRECT_IO=0 or no O_DIRECT)")


def _flags(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


def _aligned_view(data: bytes, shift: int) -> memoryview:
    """A writable view of ``data`` that starts ``shift`` bytes after a page boundary."""
    m = mmap.mmap(-1, len(data) + DIRECT_ALIGN)
    view = memoryview(m)[shift : shift + len(data)]
    view[:] = data
    return view


@pytest.mark.parametrize(
    ("pos", "length", "kind"),
    [
        (0, 3 * MIB, "bytes"),  # aligned both ends
        (1000, 3 * MIB + 123, "bytes"),  # unaligned head and tail: copied through the aligned buffer
        (5 * DIRECT_ALIGN + 7, 5 * MIB + 5000, "bytearray"),  # longer than the aligned buffer
        (8191, 2 * MIB, "aligned"),  # the caller's memory lines up with the file: written without a copy
        (4096, DIRECT_MIN - 1, "bytes"),  # too small: through the page cache
    ],
)
def test_writes_land_at_their_offsets(tmp_path: Path, pos: int, length: int, kind: str) -> None:
    st = Staging(tmp_path / "out", bytes(32), [SIZE])
    data = os.urandom(length)
    before = os.urandom(SIZE)
    st.write(0, 0, before, "f", direct=False)  # bytes around the write must survive it
    src = {"bytes": data, "bytearray": bytearray(data), "aligned": _aligned_view(data, pos % DIRECT_ALIGN)}[kind]
    st.write(0, pos, src, "f")
    st.sync()
    got = (st.path / "0.part").read_bytes()
    assert got == before[:pos] + data + before[pos + length :]
    dfd = st._direct.get(0)
    if length >= DIRECT_MIN:
        assert dfd is not None and _flags(dfd) & os.O_DIRECT  # the middle went through the O_DIRECT fd
    else:
        assert dfd is None
    st.close()


def test_direct_off_for_a_caller_that_keeps_the_pages(tmp_path: Path) -> None:
    st = Staging(tmp_path / "out", bytes(32), [SIZE])
    st.write(0, 0, os.urandom(4 * MIB), "f", direct=False)
    assert 0 not in st._direct
    st.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or r.returncode}); needs root")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True, timeout=30)


def test_a_full_disk_is_a_disk_full_error_through_direct_writes(small_disk: Path) -> None:
    st = Staging(small_disk / "out", bytes(32), [SIZE])
    with pytest.raises(DiskFullError):
        st.write(0, 0, os.urandom(4 * MIB), "f")
    st.close()
