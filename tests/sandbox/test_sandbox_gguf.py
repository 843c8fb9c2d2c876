"""GGUF verifier: files from gguf-py's writer, and absurd or misplaced headers."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from autoglm.node._gate import verify_path
from autoglm.wasm_verify import builtin_module, run_verifier

MOD = builtin_module("gguf")


def write_gguf(path: Path, vocab: int = 100) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_tensor("tok_embd.weight", np.zeros((8, 32), np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), np.float16))
    w.add_tensor("out.q8", np.zeros((2, 34), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def check(data: bytes) -> object:
    return run_verifier(MOD, lambda n: data[:n], len(data))


def test_good_gguf(tmp_path: Path) -> None:
    v = verify_path(write_gguf(tmp_path / "m.gguf"))
    assert v.ok, v.reason
    assert v.tensor_count == 3
    assert v.param_count == 256 + 1024 + 64
    assert dict(v.dtype_bytes) == {"F32": 1024, "F16": 2048, "Q8_0": 68}


def test_large_kv_section_is_fetched_in_rounds(tmp_path: Path) -> None:
    data = write_gguf(tmp_path / "m.gguf", vocab=100_000).read_bytes()
    reads: list[int] = []

    def read(n: int) -> bytes:
        reads.append(n)
        return data[:n]

    v = run_verifier(MOD, read, len(data), first_read=4096)
    assert v.ok, v.reason
    assert len(reads) > 1 and reads == sorted(reads)


def _header(tmp_path: Path) -> bytes:
    return write_gguf(tmp_path / "m.gguf").read_bytes()


@pytest.mark.parametrize(
    ("offset", "value", "code"),
    [
        (8, struct.pack("<Q", 1 << 40), "limit"),  # tensor count
        (16, struct.pack("<Q", 1 << 50), "limit"),  # kv count
        (0, b"GGUX", "bad_magic"),
        (4, struct.pack("<I", 1), "bad_version"),
    ],
)
def test_absurd_header_fields(tmp_path: Path, offset: int, value: bytes, code: str) -> None:
    data = bytearray(_header(tmp_path))
    data[offset : offset + len(value)] = value
    v = check(bytes(data))
    assert v.reason_code == code, v  # type: ignore[attr-defined]


def _tensor_info_offset(data: bytes, name: bytes) -> int:
    """Byte position of the u64 data offset in the tensor info of ``name``."""
    pos = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (nd,) = struct.unpack_from("<I", data, pos)
    return pos + 4 + 8 * nd + 4


def test_misaligned_and_out_of_bounds_offsets(tmp_path: Path) -> None:
    data = _header(tmp_path)
    pos = _tensor_info_offset(data, b"out.q8")
    mis = bytearray(data)
    mis[pos : pos + 8] = struct.pack("<Q", 33)
    assert check(bytes(mis)).reason_code == "misaligned"  # type: ignore[attr-defined]
    oob = bytearray(data)
    oob[pos : pos + 8] = struct.pack("<Q", 1 << 30)
    assert check(bytes(oob)).reason_code == "out_of_bounds"  # type: ignore[attr-defined]
    ovl = bytearray(data)
    ovl[pos : pos + 8] = struct.pack("<Q", 0)
    assert check(bytes(ovl)).reason_code == "overlap"  # type: ignore[attr-defined]


def test_absurd_array_and_string_lengths(tmp_path: Path) -> None:
    data = _header(tmp_path)
    key = b"tokenizer.ggml.tokens"
    pos = data.index(key) + len(key) + 4 + 4  # after value type ARRAY and element type
    arr = bytearray(data)
    arr[pos : pos + 8] = struct.pack("<Q", 1 << 60)
    assert check(bytes(arr)).reason_code == "limit"  # type: ignore[attr-defined]
    s = bytearray(data)
    kpos = data.index(key) - 8
    s[kpos : kpos + 8] = struct.pack("<Q", 1 << 62)
    assert check(bytes(s)).reason_code == "limit"  # type: ignore[attr-defined]


def test_truncations_never_accepted(tmp_path: Path) -> None:
    data = _header(tmp_path)
    # the last tensor ends within the alignment (32) of the end of the file
    for k in range(0, len(data) - 32, 7):
        v = check(data[:k])
        assert v.status == "reject", (k, v)  # type: ignore[attr-defined]


def test_mutation_fuzz_never_errors(tmp_path: Path) -> None:
    """Seeded byte flips in the metadata: always a clean ok or reject, never a trap or a host crash."""
    import random

    data = _header(tmp_path)
    meta_end = data.index(b"out.q8") + 64
    rng = random.Random(11)
    for case in range(300):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(meta_end)] = rng.randrange(256)
        v = check(bytes(b))
        assert v.status in ("ok", "reject"), (case, v)  # type: ignore[attr-defined]
