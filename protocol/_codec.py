"""Canonical msgpack: the only module that touches msgpack.

Canonical form: maps have text keys sorted by their UTF-8 bytes, integers use
the shortest encoding, bytes use the bin family, text the str family, and no
floats, extension types or nil-keyed maps appear. Decoding re-encodes the
result and refuses input that is not byte-identical, so every value has exactly
one encoding and hashes of encodings are stable ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = ["MAX_DEPTH", "Limits", "decode_canonical", "encode_canonical", "decode_frame_payload", "encode_frame_payload"]


#: Deepest nesting of maps and arrays a canonical value may have. Formats here
#: nest a handful of levels; the cap keeps hostile input from exhausting the
#: Python stack (a RecursionError) while it is canonicalised.
MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard caps applied while unpacking untrusted bytes."""

    max_bytes: int = 64 * 1024 * 1024
    max_str_len: int = 64 * 1024
    max_bin_len: int = 64 * 1024 * 1024
    max_array_len: int = 1_000_000
    max_map_len: int = 256
    #: Nesting of arrays and maps in the whole value (formats here nest at most 5 levels).
    max_depth: int = MAX_DEPTH
    #: Objects (every scalar, array and map) in one value: ``len(data) // bytes_per_object``
    #: plus ``min_objects``. Python spends 30 to 70 bytes on each object, so this bounds
    #: what one input can cost in memory and time to a small multiple of its size.
    bytes_per_object: int = 8
    min_objects: int = 256


def _canonicalise(value: Any, depth: int = 0) -> Any:
    if isinstance(value, (dict, list, tuple)) and depth >= MAX_DEPTH:
        raise LocalProtocolError(f"value nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise LocalProtocolError(f"map key {k!r} is not text")
        return {k: _canonicalise(value[k], depth + 1) for k in sorted(value, key=lambda s: s.encode())}
    if isinstance(value, (list, tuple)):
        return [_canonicalise(v, depth + 1) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes, int)):
        return value
    raise LocalProtocolError(f"type {type(value).__name__} is not allowed in canonical msgpack")


def encode_canonical(value: Any) -> bytes:
    """Encode ``value`` (dicts with text keys, lists, str, bytes, int, bool, None)."""
    try:
        out: bytes = msgpack.packb(_canonicalise(value), use_bin_type=True)
    except (OverflowError, ValueError, TypeError) as exc:
        raise LocalProtocolError(f"cannot encode value: {exc}") from exc
    return out


def _type_table() -> tuple[int, ...]:
    """For each msgpack type byte: bytes that follow a scalar (>= 0), or a negative code.

    -1..-4: str/bin with a length field of that many bytes; -10: fixmap/fixarray;
    -12 / -14: array16 / array32; -22 / -24: map16 / map32.
    """
    t = [0] * 256
    for b in range(0xA0, 0xC0):
        t[b] = b & 0x1F  # fixstr
    for b in range(0x80, 0xA0):
        t[b] = -10
    fixed = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4,
             0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}  # numbers, fixext
    t[0xC4:0xC7] = [-1, -2, -4]  # bin 8/16/32
    t[0xD9:0xDC] = [-1, -2, -4]  # str 8/16/32
    t[0xDC:0xE0] = [-12, -14, -22, -24]
    for b, n in fixed.items():
        t[b] = n
    return tuple(t)


_TYPES = _type_table()


def _prescan(data: bytes, limits: Limits) -> None:
    """Walk the msgpack structure without building anything; refuse it over the budgets.

    Strategy: msgpack builds Python objects as it goes (and sizes each list by
    its declared count), so nested empty arrays or tiny negative integers turn
    a few MiB into hundreds of MiB before any per-array limit can help. This
    walk counts objects and depth first, so the unpacker only ever sees input
    whose total object count and nesting are within the budget. Ext types and
    0xC1 pass here as one-byte scalars; msgpack refuses them afterwards.
    """
    budget = len(data) // limits.bytes_per_object + limits.min_objects
    end = len(data)
    types = _TYPES
    pos = objects = 0
    stack = [1]  # items still owed at each open level
    owed = 1
    while True:
        if owed == 0:
            stack.pop()
            if not stack:
                break
            owed = stack[-1]
            continue
        owed -= 1
        if pos >= end:
            raise RemoteProtocolError("malformed msgpack: truncated")
        objects += 1
        if objects > budget:
            raise RemoteProtocolError(f"value has more than {budget} objects for {len(data)} bytes")
        t = types[data[pos]]
        if t >= 0:
            pos += 1 + t
            continue
        if t > -10:  # str/bin: length field
            n = int.from_bytes(data[pos + 1 : pos - t + 1], "big")
            pos += 1 - t + n
            continue
        if t == -10:
            b = data[pos]
            count = (b & 0x0F) * (2 if b < 0x90 else 1)
            pos += 1
        else:
            w = (-t) % 10
            count = int.from_bytes(data[pos + 1 : pos + 1 + w], "big") * (2 if t <= -20 else 1)
            pos += 1 + w
        if count:
            if count > end - pos:  # every item takes at least one byte
                raise RemoteProtocolError("malformed msgpack: container longer than the input")
            if len(stack) > limits.max_depth:
                raise RemoteProtocolError(f"value nests deeper than {limits.max_depth} levels")
            stack[-1] = owed
            stack.append(count)
            owed = count
    if pos > end:
        raise RemoteProtocolError("malformed msgpack: truncated")


def _unpack(data: bytes, limits: Limits) -> Any:
    if len(data) > limits.max_bytes:
        raise RemoteProtocolError(f"encoded value is {len(data)} bytes; the limit is {limits.max_bytes}")
    _prescan(data, limits)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except (msgpack.UnpackException, msgpack.ExtraData, ValueError, TypeError, RecursionError) as exc:
        raise RemoteProtocolError(f"malformed msgpack: {exc}") from exc


def decode_canonical(data: bytes, limits: Limits = Limits()) -> Any:
    """Decode bytes produced by :func:`encode_canonical`, refusing any other encoding."""
    value = _unpack(data, limits)
    try:
        again = encode_canonical(value)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"non-canonical msgpack: {exc}") from exc
    if again != data:
        raise RemoteProtocolError("msgpack is not in canonical form")
    return value


def encode_frame_payload(value: Any) -> bytes:
    """Encode a wire message body (canonical form is not required on the wire)."""
    return encode_canonical(value)


def decode_frame_payload(data: bytes, limits: Limits) -> Any:
    """Decode a wire message body with limits; any failure is a RemoteProtocolError."""
    return _unpack(data, limits)
