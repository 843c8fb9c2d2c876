"""safetensors verifier: good files, the hostile corpus, and mutation fuzzing against the reference library."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from safetensors import SafetensorError, deserialize
from safetensors.numpy import save

from autoglm.wasm_verify import builtin_module, run_bytes, run_verifier

from ._corpus import hostile_safetensors, safetensors_bytes

MOD = builtin_module("safetensors")


def good_file(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    tensors = {
        "model.embed.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "model.layers.0.attn.q": rng.standard_normal((8, 8)).astype(np.float16),
        "model.layers.0.norm": np.ones(8, dtype=np.float64),
        "scalar": np.array(3, dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.uint8),
        "mask": np.array([True, False, True]),
    }
    return save(tensors, metadata={"format": "pt", "note": "h\u00e9llo \"quoted\""})


def reference_accepts(data: bytes) -> bool:
    try:
        deserialize(data)
    except (SafetensorError, Exception):  # the reference may raise anything on garbage
        return False
    return True


def test_good_file_counts() -> None:
    v = run_bytes(MOD, good_file())
    assert v.ok, v.reason
    assert v.tensor_count == 6
    assert v.param_count == 16 * 8 + 64 + 8 + 1 + 0 + 3
    assert dict(v.dtype_bytes) == {"F32": 512, "F16": 128, "F64": 64, "I64": 8, "U8": 0, "BOOL": 3}


def test_header_only_is_read_for_large_files() -> None:
    data = good_file()
    (n,) = struct.unpack("<Q", data[:8])
    reads: list[int] = []

    def read(k: int) -> bytes:
        reads.append(k)
        return data[:k]

    v = run_verifier(MOD, read, len(data), first_read=16)
    assert v.ok
    assert reads == [16, 8 + n]


def test_escapes_and_padding_accepted() -> None:
    header = b'{"a\\u00e9\\ud83d\\ude00":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}   '
    data = struct.pack("<Q", len(header)) + header + b"\0" * 4
    assert reference_accepts(data)
    assert run_bytes(MOD, data).ok


@pytest.mark.parametrize("name", sorted(hostile_safetensors()))
def test_hostile_corpus_refused_with_reason(name: str) -> None:
    data, code = hostile_safetensors()[name]
    v = run_bytes(MOD, data)
    assert v.status == "reject", v
    assert v.reason_code == code, v.reason
    assert v.reason
    assert not reference_accepts(data) or name in {"duplicate_name", "unknown_field"}


def test_hostile_duplicate_name() -> None:
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    v = run_bytes(MOD, struct.pack("<Q", len(header)) + header + b"\0" * 8)
    assert v.reason_code == "duplicate", v.reason


def test_many_tensors_and_deep_names() -> None:
    header = {f"t{i:05d}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(20000)}
    v = run_bytes(MOD, safetensors_bytes(header, b"\0" * 20000))
    assert v.ok and v.tensor_count == 20000


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rng.randrange(5)
    if op == 0:  # flip bytes, biased to the header
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(min(len(b), 8 + struct.unpack("<Q", data[:8])[0] + 8))
            b[pos] = rng.randrange(256)
    elif op == 1:
        del b[rng.randrange(len(b)) :]
    elif op == 2:
        b += bytes(rng.randrange(1, 9))
    elif op == 3:  # digit tweak in the JSON
        digits = [k for k in range(8, len(b)) if 0x30 <= b[k] <= 0x39]
        if digits:
            b[rng.choice(digits)] = rng.choice(b"0123456789")
    else:  # splice a JSON token
        pos = rng.randrange(8, 8 + struct.unpack("<Q", data[:8])[0])
        b[pos:pos] = rng.choice([b",", b"]", b"{", b'"', b"-1", b"1e3", b"\\u0000", b"\xc3"])
    return bytes(b)


def test_mutation_fuzz_never_looser_than_reference() -> None:
    rng = random.Random(20240521)
    base = [good_file(s) for s in range(3)] + [safetensors_bytes({"x": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\1" * 8)]
    accepted = 0
    for case in range(400):
        data = _mutate(rng, rng.choice(base))
        v = run_bytes(MOD, data)
        assert v.status in ("ok", "reject"), (case, v)
        if v.ok:
            accepted += 1
            assert reference_accepts(data), f"case {case}: sandbox accepted what safetensors rejects: {data[:200]!r}"
    assert accepted < 400
