"""Host-side work before the sandbox is bounded: hostile archives and JSON are refused cheaply.

Before, a checkpoint zip with 300,000 members cost about +147 MiB and 2 s of
host Python (zipfile builds a ZipInfo per member) and 8 MiB of small nested
JSON containers +192 MiB, before any budget applied. The gate now reads the
zip's end-of-central-directory record and walks the directory with a member
budget, and counts JSON containers and values before parsing.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest

from autoglm.node._gate import MAX_JSON_CONTAINERS, MAX_ZIP_MEMBERS, verify_path


def _raw_zip(path: Path, n: int) -> None:
    """A stored zip of ``n`` empty members under one directory, written without zipfile (fast)."""
    local, central = bytearray(), bytearray()
    crc = zlib.crc32(b"")
    for i in range(n):
        name = f"archive/data/{i}".encode()
        offset = len(local)
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, 0, 0, len(name), 0) + name
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, crc, 0, 0, len(name),
                               0, 0, 0, 0, 0, offset) + name
    count = min(n, 0xFFFF)
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), len(local), 0)
    path.write_bytes(bytes(local + central + eocd))


def _measure(path: Path):  # type: ignore[no-untyped-def]
    tracemalloc.start()
    t0 = time.process_time()
    try:
        v = verify_path(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return v, peak, time.process_time() - t0


def test_zip_with_300k_members_is_refused_before_zipfile_parses_it(tmp_path: Path) -> None:
    p = tmp_path / "pytorch_model.bin"
    _raw_zip(p, 300_000)
    v, peak, cpu = _measure(p)
    assert v.status == "reject" and v.reason_code == "limit", v
    assert "members" in v.reason or "directory" in v.reason
    assert peak < 8 << 20, peak  # was ~147 MiB


def test_zip_count_field_cannot_hide_members(tmp_path: Path) -> None:
    """The end record's count is 16 bits and may lie: the directory walk counts for itself."""
    p = tmp_path / "model.pt"
    _raw_zip(p, MAX_ZIP_MEMBERS + 1)
    data = bytearray(p.read_bytes())
    data[-12:-8] = struct.pack("<HH", 1, 1)  # claim one member
    p.write_bytes(bytes(data))
    v, peak, _ = _measure(p)
    assert v.status == "reject" and v.reason_code in ("limit", "bad_zip"), v


def test_ordinary_torch_zip_still_reaches_the_sandbox(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    v, _, _ = _measure(p)
    assert v.reason_code != "limit", v  # past the host budget: the pickle module decides


@pytest.mark.parametrize("unit", [b"[],", b"{},", b'[{"a":[]}],'])
def test_json_of_many_small_containers_is_refused_cheaply(tmp_path: Path, unit: bytes) -> None:
    p = tmp_path / "config.json"
    n = (8 << 20) // len(unit)
    p.write_bytes(b"[" + unit * n + b"[]]")
    assert n > MAX_JSON_CONTAINERS / 4
    v, peak, _ = _measure(p)
    assert v.status == "reject" and v.reason_code == "limit", v
    assert peak < 40 << 20, peak  # was ~192 MiB (the file, one stripped copy, no objects)


def test_deep_json_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_bytes(b"[" * 200_000 + b"]" * 200_000)
    v, _, _ = _measure(p)
    assert v.status == "reject"


def test_ordinary_json_with_tricky_strings_passes(tmp_path: Path) -> None:
    p = tmp_path / "tokenizer.json"
    p.write_bytes(b'{"vocab": {"[": 1, "{": 2, "\\"[[": 3, "a\\\\": 4}, "merges": [["a", "b"], ["[", "]"]], '
                  b'"deep": [[[[[[[[[[1]]]]]]]]]]}')
    v, _, _ = _measure(p)
    assert v.ok, v
