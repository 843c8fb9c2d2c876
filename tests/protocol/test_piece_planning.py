"""Piece planning is pure: fixed, tensor-aligned (safetensors, GGUF), member-aligned (zip) and content-defined plans."""

from __future__ import annotations

import json
import random
import struct
import zipfile
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
from cdc_reference import gear as reference_gear
from cdc_reference import reference_plan, vector_bytes
from formats import gguf_data_spans, write_gguf, write_torch_zip, zip_data_spans
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.node._publish import plan_cdc_file, plan_file
from autoglm.protocol import (
    CdcParams,
    NeedMoreData,
    RemoteProtocolError,
    _zipmembers,
    cdc_params_for,
    gguf_tensor_spans,
    plan_cdc,
    plan_cdc_reader,
    plan_fixed,
    plan_runs,
    plan_safetensors,
    safetensors_header_length,
    safetensors_tensor_spans,
    zip_member_spans,
)
from autoglm.protocol._cdc import CDC_GEAR_SEED, gear_table


@pytest.mark.parametrize(
    ("size", "max_piece", "plan"),
    [
        (0, 4, []),
        (1, 4, [(0, 1)]),
        (4, 4, [(0, 4)]),
        (5, 4, [(0, 4), (4, 1)]),
        (9, 4, [(0, 4), (4, 4), (8, 1)]),
        (3, 1, [(0, 1), (1, 1), (2, 1)]),
    ],
)
def test_plan_fixed(size: int, max_piece: int, plan: list[tuple[int, int]]) -> None:
    assert plan_fixed(size, max_piece) == plan


def test_plan_fixed_refuses_zero_piece_size() -> None:
    with pytest.raises(ValueError):
        plan_fixed(10, 0)


@pytest.mark.parametrize(
    ("file_size", "header_len", "tensors", "max_piece", "plan"),
    [
        # header 8+8=16 bytes; tensors of 10 and 3 bytes; max 8
        (29, 8, [(16, 10), (26, 3)], 8, [(0, 8), (8, 8), (16, 8), (24, 2), (26, 3)]),
        # header fits one piece; one tensor exactly max
        (24, 8, [(16, 8)], 16, [(0, 16), (16, 8)]),
        # a gap between tensors and trailing bytes get pieces of their own
        (40, 8, [(16, 4), (24, 4)], 16, [(0, 16), (16, 4), (20, 4), (24, 4), (28, 12)]),
        # zero-length tensors add no piece
        (20, 8, [(16, 0), (16, 4)], 16, [(0, 16), (16, 4)]),
    ],
)
def test_plan_safetensors(
    file_size: int, header_len: int, tensors: list[tuple[int, int]], max_piece: int, plan: list[tuple[int, int]]
) -> None:
    assert plan_safetensors(file_size, header_len, tensors, max_piece) == plan


@given(
    header_len=st.integers(0, 40),
    lengths=st.lists(st.integers(0, 50), max_size=8),
    gaps=st.lists(st.integers(0, 5), min_size=9, max_size=9),
    trailing=st.integers(0, 20),
    max_piece=st.integers(1, 32),
)
def test_plan_safetensors_invariants(
    header_len: int, lengths: list[int], gaps: list[int], trailing: int, max_piece: int
) -> None:
    pos = 8 + header_len
    tensors = []
    for n, gap in zip(lengths, gaps, strict=False):
        pos += gap
        tensors.append((pos, n))
        pos += n
    size = pos + trailing
    plan = plan_safetensors(size, header_len, tensors, max_piece)
    # contiguous cover of the file, every piece within the limit
    assert [o for o, _ in plan] == [sum(n for _, n in plan[:i]) for i in range(len(plan))]
    assert sum(n for _, n in plan) == size
    assert all(1 <= n <= max_piece for _, n in plan)
    # every tensor starts and ends on a piece boundary; the header ends on one
    boundaries = {o for o, _ in plan} | {size}
    assert 8 + header_len in boundaries or size == 8 + header_len
    for off, n in tensors:
        if n:
            assert off in boundaries and off + n in boundaries


def _header(obj: object, pad: int = 0) -> bytes:
    raw = json.dumps(obj).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw


def test_header_length_and_spans() -> None:
    hdr = _header(
        {"__metadata__": {"a": "b"}, "w2": {"data_offsets": [4, 10]}, "w1": {"data_offsets": [0, 4]}}, pad=3
    )
    size = len(hdr) + 10
    n = safetensors_header_length(hdr[:8], size)
    assert n == len(hdr) - 8
    assert safetensors_tensor_spans(hdr[8:], size) == [(len(hdr), 4), (len(hdr) + 4, 6)]


@pytest.mark.parametrize(
    ("prefix", "size"),
    [
        (b"\x01\x00", 100),
        (struct.pack("<Q", 100), 50),
        (struct.pack("<Q", 200 * 1024 * 1024), 1 << 40),
        (struct.pack("<Q", 1), 4),
    ],
)
def test_bad_header_length(prefix: bytes, size: int) -> None:
    with pytest.raises(RemoteProtocolError):
        safetensors_header_length(prefix, size)


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"w": {"data_offsets": [4, 2]}}',
        b'{"w": {"data_offsets": [0, 1000]}}',
        b'{"w": {"data_offsets": [0]}}',
        b'{"w": {"data_offsets": [true, 2]}}',
        b'{"w": {"data_offsets": [-1, 2]}}',
        b'{"w": {}}',
        b'{"w": 5}',
        b'{"a": {"data_offsets": [0, 4]}, "b": {"data_offsets": [2, 6]}}',
        b"[" * 100_000,
    ],
)
def test_bad_tensor_table(header: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        safetensors_tensor_spans(header, 8 + len(header) + 10)


# ---------------------------------------------------------------------------
# plan_runs: the general aligned plan (GGUF tensors, zip members)


@pytest.mark.parametrize(
    ("size", "runs", "max_piece", "plan"),
    [
        (0, [], 4, []),
        (10, [], 4, [(0, 4), (4, 4), (8, 2)]),
        (10, [(2, 5)], 4, [(0, 2), (2, 4), (6, 1), (7, 3)]),
        (10, [(0, 10)], 16, [(0, 10)]),
        (10, [(0, 3), (3, 0), (3, 7)], 16, [(0, 3), (3, 7)]),
    ],
)
def test_plan_runs(size: int, runs: list[tuple[int, int]], max_piece: int, plan: list[tuple[int, int]]) -> None:
    assert plan_runs(size, runs, max_piece) == plan


@pytest.mark.parametrize(("size", "runs"), [(10, [(5, 3), (6, 1)]), (10, [(8, 5)])])
def test_plan_runs_refuses_overlap(size: int, runs: list[tuple[int, int]]) -> None:
    with pytest.raises(RemoteProtocolError):
        plan_runs(size, runs, 4)


# ---------------------------------------------------------------------------
# Content-defined chunking

SMALL = CdcParams(min_size=64, bits=8, max_size=1024)
VECTORS = Path(__file__).resolve().parent.parent / "vectors"


def _random(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_gear_table_is_the_documented_one() -> None:
    vec = json.loads((VECTORS / "cdc-v1.json").read_text())
    assert vec["gear_seed"].encode() == CDC_GEAR_SEED
    assert [f"{w:08x}" for w in gear_table()] == vec["gear"] == [f"{w:08x}" for w in reference_gear()]
    table = b"".join(w.to_bytes(4, "little") for w in gear_table())
    assert blake3.blake3(table).hexdigest() == vec["gear_blake3"]


def _vector_input(spec: dict[str, Any]) -> bytes:
    data = vector_bytes(spec["seed"], spec["length"]) if spec["kind"] == "blake3-xof" else bytes([spec["byte"]]) * spec["length"]
    if "insert" in spec:
        ins = spec["insert"]
        data = data[: ins["at"]] + vector_bytes(ins["seed"], ins["length"]) + data[ins["at"] :]
    return data


@pytest.mark.parametrize("case", json.loads((VECTORS / "cdc-v1.json").read_text())["cases"], ids=lambda c: c["name"])
def test_cdc_golden_vectors(case: dict[str, Any]) -> None:
    data = _vector_input(case["input"])
    p = case["params"]
    params = CdcParams(min_size=p["min"], bits=p["bits"], max_size=p["max"])
    plan = plan_cdc(data, params)
    assert [list(s) for s in plan] == case["pieces"]
    assert [blake3.blake3(data[o : o + n]).hexdigest() for o, n in plan] == case["piece_blake3"]
    # the streaming form agrees, whatever the block size
    assert plan_cdc_reader(lambda o, n: data[o : o + n], 0, len(data), params, block=4099) == plan
    if len(data) <= 100_000:
        assert reference_plan(data, p["min"], p["bits"], p["max"]) == plan


def test_cdc_insertion_vector_shares_all_but_nearby_pieces() -> None:
    cases = {c["name"]: c for c in json.loads((VECTORS / "cdc-v1.json").read_text())["cases"]}
    before = set(cases["random-small"]["piece_blake3"])
    after = cases["random-small-insert"]["piece_blake3"]
    assert len([h for h in after if h not in before]) <= 3


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(0, 40_000))
def test_cdc_matches_reference_and_covers(seed: int, n: int) -> None:
    data = _random(seed, n)
    plan = plan_cdc(data, SMALL)
    assert plan == reference_plan(data, 64, 8, 1024)
    assert [o for o, _ in plan] == [sum(x for _, x in plan[:i]) for i in range(len(plan))]
    assert sum(x for _, x in plan) == n
    assert all(1 <= x <= SMALL.max_size for _, x in plan)
    assert all(x >= SMALL.min_size for _, x in plan[:-1])
    assert plan_cdc(data, SMALL) == plan  # deterministic


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(2_000, 60_000), at=st.floats(0, 1), ins=st.binary(min_size=1, max_size=300))
def test_cdc_insertion_moves_only_nearby_boundaries(seed: int, n: int, at: float, ins: bytes) -> None:
    v1 = _random(seed, n)
    p = int(at * n)
    v2 = v1[:p] + ins + v1[p:]
    plan1, plan2 = plan_cdc(v1, SMALL), plan_cdc(v2, SMALL)
    # every piece that ends at or before the edit (by content, not at the end of v1) is unchanged
    kept = [s for s in plan1 if s[0] + s[1] <= p and s[0] + s[1] < n]
    assert plan2[: len(kept)] == kept
    # bytes of v2 in pieces v1 does not have: the insertion plus a few pieces around it
    old = {v1[o : o + k] for o, k in plan1}
    new_bytes = sum(k for o, k in plan2 if v2[o : o + k] not in old)
    assert new_bytes <= len(ins) + 4 * SMALL.max_size


@settings(max_examples=40, deadline=None)
@given(max_piece=st.integers(1, 64 << 20))
def test_cdc_params_for_any_max_piece(max_piece: int) -> None:
    params = cdc_params_for(max_piece)
    if params is None:
        assert max_piece < 256
    else:
        assert params.max_size <= max_piece and 64 <= params.min_size <= params.avg_size <= params.max_size


# ---------------------------------------------------------------------------
# GGUF: tensor-aligned plans on files the gguf package writes


def _gguf_tensors(seed: int, n: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i in range(n):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 300)))
        dt = [np.float32, np.float16][i % 2]
        out[f"blk.{i}.weight"] = rng.standard_normal(shape).astype(dt)
    return out


def _plan(path: Path, max_piece: int) -> list[tuple[int, int]]:
    return plan_file(path, path.stat().st_size, max_piece)


def _assert_aligned(plan: list[tuple[int, int]], spans: list[tuple[int, int]], size: int, max_piece: int) -> None:
    assert [o for o, _ in plan] == [sum(x for _, x in plan[:i]) for i in range(len(plan))]
    assert sum(x for _, x in plan) == size
    assert all(1 <= x <= max_piece for _, x in plan)
    bounds = {o for o, _ in plan} | {size}
    for off, n in spans:
        if n:
            assert off in bounds and off + n in bounds, (off, n)


@pytest.mark.parametrize("max_piece", [256, 4096, 1 << 20])
def test_gguf_plan_aligns_to_tensors(tmp_path: Path, max_piece: int) -> None:
    path = tmp_path / "m.gguf"
    write_gguf(path, _gguf_tensors(1), {"general.name": "t"})
    spans = gguf_data_spans(path)
    data = path.read_bytes()
    _, mine = gguf_tensor_spans(data, len(data))
    assert mine == spans
    plan = _plan(path, max_piece)
    _assert_aligned(plan, spans, len(data), max_piece)
    assert plan[0] == (0, 24)  # the preamble with the counts is a piece of its own


def test_gguf_new_metadata_key_and_changed_tensor_keep_other_pieces(tmp_path: Path) -> None:
    t1 = _gguf_tensors(2)
    t2 = dict(t1)
    t2["blk.3.weight"] = t1["blk.3.weight"] + 1
    write_gguf(tmp_path / "v1.gguf", t1, {"general.name": "t"})
    write_gguf(tmp_path / "v2.gguf", t2, {"general.name": "t", "general.inserted": "x" * 300})
    d1, d2 = (tmp_path / "v1.gguf").read_bytes(), (tmp_path / "v2.gguf").read_bytes()
    old = {d1[o : o + n] for o, n in _plan(tmp_path / "v1.gguf", 1 << 20)}
    new = [(o, n) for o, n in _plan(tmp_path / "v2.gguf", 1 << 20) if d2[o : o + n] not in old]
    changed = t2["blk.3.weight"].nbytes
    header = gguf_tensor_spans(d2, len(d2))[0]
    # only the header and the changed tensor (and padding after it) are new
    assert sum(n for _, n in new) <= header + changed + 32
    assert any(n == changed for _, n in new)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:20],  # truncated in the counts
        lambda d: d[:4] + struct.pack("<I", 1) + d[8:],  # version 1
        lambda d: d[:8] + struct.pack("<Q", 10**9) + d[16:],  # absurd tensor count
        lambda d: d[:16] + struct.pack("<Q", 10**9) + d[24:],  # absurd metadata count
        lambda d: d[:24] + struct.pack("<Q", 1 << 40) + d[32:],  # key length beyond the cap
        lambda d: b"GGUX" + d[4:],
    ],
)
def test_gguf_bad_headers_are_clear_errors(tmp_path: Path, mutate: Any) -> None:
    path = tmp_path / "m.gguf"
    write_gguf(path, _gguf_tensors(3), {"general.name": "t"})
    bad = mutate(path.read_bytes())
    with pytest.raises((RemoteProtocolError, NeedMoreData)):
        gguf_tensor_spans(bad, len(bad))
    # the publisher plans such a file as generic bytes
    path.write_bytes(bad)
    _assert_aligned(_plan(path, 4096), [], len(bad), 4096)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_gguf_parser_fuzz(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    base = _FUZZ_GGUF.get("bytes")
    if base is None:
        path = tmp_path_factory.mktemp("g") / "m.gguf"
        write_gguf(path, _gguf_tensors(4, 3), {"general.name": "t"})
        base = _FUZZ_GGUF["bytes"] = path.read_bytes()
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    try:
        start, spans = gguf_tensor_spans(bytes(buf[:cut]), len(buf))
    except (RemoteProtocolError, NeedMoreData):
        return
    assert start <= len(buf)
    assert plan_runs(len(buf), spans, 4096)  # a plan that parses is a valid plan


_FUZZ_GGUF: dict[str, bytes] = {}


# ---------------------------------------------------------------------------
# PyTorch zip checkpoints: member-aligned


def _torch_tensors(seed: int, n: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer.{i}.weight": rng.standard_normal(int(rng.integers(1, 3000))).astype(np.float32) for i in range(n)}


@pytest.mark.parametrize("max_piece", [256, 1 << 20])
def test_zip_plan_aligns_to_members(tmp_path: Path, max_piece: int) -> None:
    path = tmp_path / "pytorch_model.bin"
    write_torch_zip(path, _torch_tensors(1))
    spans = zip_data_spans(path)
    data = path.read_bytes()
    (cd_off, cd_len), mine = zip_member_spans(lambda o, n: data[o : o + n], len(data))
    assert mine == spans
    # the central directory has boundaries of its own too
    _assert_aligned(_plan(path, max_piece), [*spans, (cd_off, cd_len)], len(data), max_piece)


def test_zip_changed_member_keeps_other_pieces(tmp_path: Path) -> None:
    t1 = _torch_tensors(2)
    t2 = dict(t1)
    t2["layer.2.weight"] = t1["layer.2.weight"] * 2
    write_torch_zip(tmp_path / "v1.pt", t1)
    write_torch_zip(tmp_path / "v2.pt", t2)
    d1, d2 = (tmp_path / "v1.pt").read_bytes(), (tmp_path / "v2.pt").read_bytes()
    old = {d1[o : o + n] for o, n in _plan(tmp_path / "v1.pt", 1 << 20)}
    new = [(o, n) for o, n in _plan(tmp_path / "v2.pt", 1 << 20) if d2[o : o + n] not in old]
    (cd_off, cd_len), _ = zip_member_spans(lambda o, n: d2[o : o + n], len(d2))
    # the changed member, its local header (new CRC) and the central directory
    assert sum(n for _, n in new) <= t2["layer.2.weight"].nbytes + 128 + cd_len
    assert any(n == t2["layer.2.weight"].nbytes for _, n in new)


def test_zip64_archive(tmp_path: Path) -> None:
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("a", "w", force_zip64=True) as f:
            f.write(b"x" * 1000)
        zf.writestr("b", b"y" * 10)
    data = path.read_bytes()
    _, mine = zip_member_spans(lambda o, n: data[o : o + n], len(data))
    assert mine == zip_data_spans(path)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:-22],  # no end record
        lambda d: d[:-12] + struct.pack("<I", 1 << 31) + d[-8:],  # central directory beyond the file
        lambda d: d[:-14] + struct.pack("<H", 0) + d[-12:],  # fewer entries than listed? (entry count 0: empty plan)
        lambda d: d[:-6] + struct.pack("<I", 3) + d[-2:],  # directory offset inside a member
    ],
)
def test_zip_bad_directories(tmp_path: Path, mutate: Any) -> None:
    path = tmp_path / "m.pt"
    write_torch_zip(path, _torch_tensors(3, 2))
    bad = mutate(path.read_bytes())
    try:
        _, spans = zip_member_spans(lambda o, n: bad[o : o + n], len(bad))
    except RemoteProtocolError:
        spans = []
    path.write_bytes(bad)
    _assert_aligned(_plan(path, 4096), spans, len(bad), 4096)


def test_zip_member_cap(tmp_path: Path) -> None:
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(20):
            zf.writestr(f"m{i}", b"")
    data = path.read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_zipmembers, "ZIP_MAX_MEMBERS", 10)
        with pytest.raises(RemoteProtocolError, match="members"):
            zip_member_spans(lambda o, n: data[o : o + n], len(data))


def test_generic_files_are_content_defined(tmp_path: Path) -> None:
    body = _random(9, 300_000)
    (tmp_path / "a.bin").write_bytes(body)
    (tmp_path / "b.bin").write_bytes(body[:150_000] + b"inserted" + body[150_000:])
    pa, pb = _plan(tmp_path / "a.bin", 4096), _plan(tmp_path / "b.bin", 4096)
    assert pa == plan_cdc(body, cdc_params_for(4096))  # type: ignore[arg-type]
    old = {body[o : o + n] for o, n in pa}
    bdata = (tmp_path / "b.bin").read_bytes()
    assert sum(n for o, n in pb if bdata[o : o + n] not in old) <= 8 + 4 * 4096


def test_plan_runs_forced_cuts_inside_gaps() -> None:
    assert plan_runs(20, [(10, 4)], 16, cuts=(3, 12, 30)) == [(0, 3), (3, 7), (10, 4), (14, 6)]
    assert plan_runs(20, [], 16, cuts=(5, 5)) == [(0, 5), (5, 15)]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(0, 200_000), block=st.integers(1, 70_000))
def test_threaded_file_planner_matches_the_pure_one(seed: int, n: int, block: int) -> None:
    data = _random(seed, n)
    got = plan_cdc_file(lambda o, k: data[o : o + k], 0, n, SMALL, block=block)
    assert got == plan_cdc(data, SMALL)
    # an inner span (a gap between tensors) is planned on its own bytes
    assert plan_cdc_file(lambda o, k: data[o : o + k], n // 3, n // 2, SMALL, block=block) == plan_cdc(
        data[n // 3 : n // 3 + n // 2], SMALL, base=n // 3
    )


_FUZZ_ZIP: dict[str, bytes] = {}


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_zip_parser_fuzz(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    base = _FUZZ_ZIP.get("bytes")
    if base is None:
        path = tmp_path_factory.mktemp("z") / "m.pt"
        write_torch_zip(path, _torch_tensors(5, 3))
        base = _FUZZ_ZIP["bytes"] = path.read_bytes()
    buf = bytearray(base)
    tail_bias = data.draw(st.booleans())  # the directory and end records are where the parser reads
    for _ in range(data.draw(st.integers(1, 6))):
        lo = max(0, len(buf) - 400) if tail_bias else 0
        i = data.draw(st.integers(lo, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(len(buf) // 2, len(buf)))
    blob = bytes(buf[:cut])
    try:
        (cd_off, cd_len), spans = zip_member_spans(lambda o, n: blob[o : o + n], len(blob))
    except RemoteProtocolError:
        return
    assert cd_off + cd_len <= len(blob)
    assert plan_runs(len(blob), spans, 4096, cuts=(cd_off, cd_off + cd_len))
