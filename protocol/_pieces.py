"""Piece planning: where piece boundaries fall in a file. Pure functions.

For ``.safetensors`` files the boundaries follow tensors: the header is its
own piece (or pieces, if it is larger than the maximum piece size) and each
tensor's byte span is split into pieces of at most the maximum size. A
fine-tune that changes some tensors therefore leaves the pieces of every other
tensor byte-identical, so a delta update re-fetches only what changed.

GGUF files (:mod:`._gguf`) and zip checkpoints (:mod:`._zipmembers`) are
planned the same way with :func:`plan_runs`: each tensor's (member's) data is
a run of its own, and the bytes between runs (header, metadata, tensor infos,
local headers, central directory) are cut by content-defined chunking
(:mod:`._cdc`), as is every other file. The same input always gives the same
plan. docs/manifest.md ("Piece planning") states the rules.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from typing import Any

from ._errors import RemoteProtocolError

__all__ = [
    "SAFETENSORS_MAX_HEADER",
    "Span",
    "plan_fixed",
    "plan_runs",
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


def plan_runs(
    file_size: int,
    runs: list[Span],
    max_piece: int,
    gap: Callable[[int, int], list[Span]] | None = None,
    cuts: Iterable[int] = (),
) -> list[Span]:
    """Pieces that start and end on every run boundary.

    ``runs`` are sorted, non-overlapping (offset, length) spans inside the
    file (tensor or member data); each is split into pieces of at most
    ``max_piece``. The bytes before, between and after runs are planned by
    ``gap(offset, length)`` (fixed pieces if ``None``), which must cover its
    span exactly with pieces of at most ``max_piece``. ``cuts`` are extra
    boundaries forced inside gaps (a GGUF file's fixed preamble, a zip's
    central directory), so bytes that change on every edit stay in small
    pieces of their own.
    """
    forced = sorted(set(cuts))

    def fill(off: int, length: int) -> list[Span]:
        out: list[Span] = []
        end = off + length
        for c in [*(c for c in forced if off < c < end), end]:
            out += gap(off, c - off) if gap is not None else _split(off, c - off, max_piece)
            off = c
        return out

    pieces: list[Span] = []
    pos = 0
    for off, length in runs:
        if off < pos or off + length > file_size:
            raise RemoteProtocolError(f"run at {off} overlaps the previous one or the end of the file")
        if off > pos:
            pieces += fill(pos, off - pos)
        pieces += _split(off, length, max_piece)
        pos = off + length
    if pos < file_size:
        pieces += fill(pos, file_size - pos)
    return pieces
