"""Decode amplification: a hostile value costs a small multiple of its size, whatever its shape.

msgpack builds a Python object for every byte-sized item (an empty array is 1
byte on the wire and 64 bytes in Python), and limits per array do not bound a
tree of small arrays. The codec counts objects and depth before unpacking:
these inputs must be refused with RemoteProtocolError, and the peak traced
memory while refusing them must stay within a few times the input size.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from autoglm.protocol import RemoteProtocolError
from autoglm.protocol._codec import Limits, decode_canonical, decode_frame_payload, encode_canonical
from autoglm.protocol._control import MAX_CONTROL_FRAME, decode_control
from autoglm.protocol._manifest import decode_manifest
from autoglm.protocol._signing import MAGIC, decode_signed_manifest


def _array(n: int) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big")


def _tree(branch: int, depth: int) -> bytes:
    """A complete tree of arrays, `branch` wide and `depth` deep, empty arrays at the leaves."""
    node = b"\x90"
    for _ in range(depth):
        node = bytes([0x90 | branch]) + node * branch
    return node


def _envelope_of_trees() -> bytes:
    # The envelope allows arrays of 8 (the certificate chain): a tree of 8-wide arrays, 7 deep.
    tree = _tree(8, 7)
    body = b"\x85" + b"\xa5chain" + tree + b"\xa8manifest\xc4\x00" + b"\xa6pubkey\xc4\x00" + b"\xa3sig\xc4\x00" + b"\xa1v\x01"
    return MAGIC + body


def _manifest_of_empty_arrays() -> bytes:
    n = 1_900_000  # under the per-array cap of 2,000,000 pieces
    return b"\x81\xa5files" + _array(n) + b"\x90" * n


def _control_of_empty_arrays() -> bytes:
    # 64-wide arrays (MAX_MANIFESTS) of 64-wide arrays of empty arrays: a 4 MiB control frame.
    tree = _tree(15, 5)
    return b"\x92\x01" + tree


def _negative_fixints() -> bytes:
    # -32..-6 are not cached by CPython: 36 bytes of Python for each byte of input.
    n = 1_000_000
    return _array(n) + b"\xe0" * n


CASES: list[tuple[str, Callable[[bytes], Any], bytes]] = [
    ("envelope", decode_signed_manifest, _envelope_of_trees()),
    ("manifest", decode_manifest, _manifest_of_empty_arrays()),
    ("control", decode_control, _control_of_empty_arrays()),
    ("fixints", lambda d: decode_canonical(d, Limits(max_array_len=2_000_000)), _negative_fixints()),
]


@pytest.mark.parametrize(("fn", "data"), [pytest.param(fn, data, id=name) for name, fn, data in CASES])
def test_hostile_value_is_refused_within_a_small_multiple_of_its_size(fn: Callable[[bytes], Any], data: bytes) -> None:
    assert len(data) <= MAX_CONTROL_FRAME or fn is decode_manifest
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError):
            fn(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Before the object budget these peaked at 60 to 150 times their size.
    assert peak < 4 * len(data) + (1 << 20), (peak, len(data))


def test_object_budget_is_per_value_and_exact() -> None:
    limits = Limits(bytes_per_object=8, min_objects=0)
    small = encode_canonical([[]] * 7)  # 8 objects in 8 bytes: the budget is 8 // 8 = 1
    with pytest.raises(RemoteProtocolError, match="objects"):
        decode_frame_payload(small, limits)
    fits = encode_canonical([b"x" * 60, b"y" * 60])  # 3 objects in 127 bytes
    assert decode_frame_payload(fits, limits) == [b"x" * 60, b"y" * 60]


def test_depth_budget() -> None:
    limits = Limits(max_depth=4)
    assert decode_frame_payload(b"\x91" * 4 + b"\xc0", limits) is not None
    with pytest.raises(RemoteProtocolError, match="deeper"):
        decode_frame_payload(b"\x91" * 5 + b"\xc0", limits)


@pytest.mark.parametrize("data", [
    _array(1_000_000) + b"\x90",  # declares a million items, has one
    _array(1_000_000) * 1000,  # 5 KB of nested headers: msgpack sized each list up front (76 MiB)
    b"\x91" * 10,  # truncated
    b"\xc4\x10abc",  # bin longer than the input
    b"\xdb\xff\xff\xff\xff",  # str of 4 GiB
    b"\xdf\xff\xff\xff\xff",  # map of 4G entries
])
def test_declared_sizes_larger_than_the_input_are_refused_before_any_allocation(data: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError):
            decode_frame_payload(data, Limits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10
