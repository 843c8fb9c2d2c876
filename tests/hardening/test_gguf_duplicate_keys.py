"""GGUF metadata with a key listed twice is refused by the sandboxed verifier.

llama.cpp refuses such files (gguf_init_from_file: duplicate key); a verifier
that accepts them lets two parsers disagree on what a file says (which
`general.alignment` or `tokenizer.ggml.tokens` counts).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from autoglm.node._gate import verify_path


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _kv_str(key: bytes, value: bytes) -> bytes:
    return _string(key) + struct.pack("<I", 8) + _string(value)


def _kv_u32(key: bytes, value: int) -> bytes:
    return _string(key) + struct.pack("<I", 4) + struct.pack("<I", value)


def _gguf(kvs: list[bytes]) -> bytes:
    body = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs)
    return body + b"\0" * (-len(body) % 32)


@pytest.mark.parametrize("kvs", [
    [_kv_str(b"general.name", b"a"), _kv_str(b"general.name", b"b")],
    [_kv_u32(b"general.alignment", 32), _kv_str(b"x", b"y"), _kv_u32(b"general.alignment", 64)],
    [_kv_str(b"k%d" % i, b"v") for i in range(500)] + [_kv_str(b"k250", b"w")],
])
def test_duplicate_metadata_key_is_refused(tmp_path: Path, kvs: list[bytes]) -> None:
    p = tmp_path / "m.gguf"
    p.write_bytes(_gguf(kvs))
    v = verify_path(p)
    assert v.status == "reject" and v.reason_code == "duplicate", v
    assert "listed twice" in v.reason


def test_distinct_metadata_keys_pass(tmp_path: Path) -> None:
    p = tmp_path / "m.gguf"
    # keys that differ only in length or case are distinct
    p.write_bytes(_gguf([_kv_str(b"general.name", b"a"), _kv_str(b"general.nam", b"b"), _kv_str(b"General.name", b"c")]))
    v = verify_path(p)
    assert v.ok, v
