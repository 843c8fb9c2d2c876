"""Piece planning is pure: table-driven cases for fixed and tensor-aligned plans."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoglm.protocol import (
    RemoteProtocolError,
    plan_fixed,
    plan_safetensors,
    safetensors_header_length,
    safetensors_tensor_spans,
)


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
