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


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard caps applied while unpacking untrusted bytes."""

    max_bytes: int = 64 * 1024 * 1024
    max_str_len: int = 64 * 1024
    max_bin_len: int = 64 * 1024 * 1024
    max_array_len: int = 1_000_000
    max_map_len: int = 256


#: Deepest nesting of maps and arrays a canonical value may have. Formats here
#: nest a handful of levels; the cap keeps hostile input from exhausting the
#: Python stack (a RecursionError) while it is canonicalised.
MAX_DEPTH = 32


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


def _unpack(data: bytes, limits: Limits) -> Any:
    if len(data) > limits.max_bytes:
        raise RemoteProtocolError(f"encoded value is {len(data)} bytes; the limit is {limits.max_bytes}")
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
