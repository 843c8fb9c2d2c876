"""Piece planning: where piece boundaries fall in a file. Pure functions.

For ``.safetensors`` files the boundaries follow tensors: the header is its
own piece (or pieces, if it is larger than the maximum piece size) and each
tensor's byte span is split into pieces of at most the maximum size. A
fine-tune that changes some tensors therefore leaves the pieces of every other
tensor byte-identical, so a delta update re-fetches only what changed. Other
files are cut into fixed-size pieces. The same input always gives the same
plan.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from ._errors import RemoteProtocolError

__all__ = [
    "SAFETENSORS_MAX_HEADER",
    "Span",
    "plan_fixed",
    "plan_safetensors",
    "safetensors_header_length",
    "safetensors_tensor_spans",
]

Span = tuple[int, int]  # (offset, length)
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def _split(offset: int, length: int, max_piece: int) -> list[Span]:
    return [(o, min(max_piece, offset + length - o)) for o in range(offset, offset + length, max_piece)]


def plan_fixed(size: int, max_piece: int) -> list[Span]:
    """Fixed-size pieces covering ``size`` bytes (none for an empty file)."""
    if max_piece < 1:
        raise ValueError("max_piece must be positive")
    return _split(0, size, max_piece)


def safetensors_header_length(prefix: bytes, file_size: int) -> int:
    """Length of the JSON header, from the file's first 8 bytes."""
    if len(prefix) < 8 or file_size < 8:
        raise RemoteProtocolError("safetensors file shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > SAFETENSORS_MAX_HEADER or 8 + n > file_size:
        raise RemoteProtocolError(f"safetensors header length {n} is beyond the file or the limit")
    return int(n)


def safetensors_tensor_spans(header: bytes, file_size: int) -> list[Span]:
    """Absolute (offset, length) of each tensor's bytes, sorted by offset.

    ``header`` is the JSON header (without the 8-byte length). The publisher
    only needs spans to cut pieces; the full structural check of a
    safetensors file is the sandbox verifier's job.
    """
    try:
        obj: Any = json.loads(header.rstrip(b" ").decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise RemoteProtocolError("safetensors header is not a JSON object")
    base = 8 + len(header)
    spans: list[Span] = []
    for name, info in obj.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
            or base + offs[1] > file_size
        ):
            raise RemoteProtocolError(f"safetensors tensor {name!r} has bad data_offsets")
        spans.append((base + offs[0], offs[1] - offs[0]))
    spans.sort()
    for (a, alen), (b, _) in zip(spans, spans[1:], strict=False):
        if a + alen > b:
            raise RemoteProtocolError("safetensors tensors overlap")
    return spans


def plan_safetensors(file_size: int, header_len: int, tensors: list[Span], max_piece: int) -> list[Span]:
    """Tensor-aligned pieces. Gaps and trailing bytes get fixed-size pieces of their own."""
    pieces = _split(0, 8 + header_len, max_piece)
    pos = 8 + header_len
    for off, length in tensors:
        if off > pos:
            pieces += _split(pos, off - pos, max_piece)
        pieces += _split(off, length, max_piece)
        pos = max(pos, off + length)
    if pos < file_size:
        pieces += _split(pos, file_size - pos, max_piece)
    return pieces
