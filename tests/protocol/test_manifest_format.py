"""Manifest v1: Hypothesis round trips, schema refusals and limits.

Refusal tests build raw dicts and encode them with encode_canonical, which
bypasses the typed model, so the decoder alone stands between them and a node.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from manifest_strategies import manifests

from autoglm.protocol import (
    FileEntry,
    LocalProtocolError,
    Manifest,
    ManifestLimits,
    Piece,
    RemoteProtocolError,
    decode_manifest,
    encode_canonical,
)

H = hashlib.sha256(b"h").digest()


def base_manifest() -> Manifest:
    return Manifest(
        name="org/model",
        version="1",
        created_at=1,
        publisher="p",
        files=(
            FileEntry("a.bin", 20, H, (Piece(0, 8, H), Piece(8, 8, H), Piece(16, 4, H))),
            FileEntry("b/c.bin", 3, H, (Piece(0, 3, H),)),
        ),
        max_piece_size=8,
    )


def raw() -> dict[str, Any]:
    return copy.deepcopy(base_manifest().to_value())


@settings(max_examples=200, deadline=None)
@given(manifests())
def test_round_trip(m: Manifest) -> None:
    data = m.encode()
    back = decode_manifest(data)
    assert back == m
    assert back.encode() == data
    assert back.id == m.id == hashlib.sha256(data).digest()
    m.validate()


def test_base_manifest_is_valid() -> None:
    assert decode_manifest(encode_canonical(raw())) == base_manifest()


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def f(v: dict[str, Any]) -> None:
        v[key] = value

    return f


def _file(i: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def f(v: dict[str, Any]) -> None:
        v["files"][i][key] = value

    return f


def _del(key: str) -> Callable[[dict[str, Any]], None]:
    def f(v: dict[str, Any]) -> None:
        del v[key]

    return f


MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "unknown top-level field": _set("extra", 1),
    "missing name": _del("name"),
    "missing files": _del("files"),
    "format 2": _set("format", 2),
    "format true": _set("format", True),
    "format as text": _set("format", "1"),
    "empty name": _set("name", ""),
    "name with a newline": _set("name", "a\nb"),
    "name too long": _set("name", "x" * 129),
    "publisher too long": _set("publisher", "x" * 65),
    "created_at negative": _set("created_at", -1),
    "created_at as bool": _set("created_at", True),
    "max_piece zero": _set("max_piece", 0),
    "no files": _set("files", []),
    "files not a list": _set("files", {"a": 1}),
    "file not a map": _set("files", [1]),
    "file with an extra field": _file(0, "mode", 0o644),
    "size does not match pieces": _file(0, "size", 21),
    "size as bool": _file(1, "size", True),
    "sha256 of 31 bytes": _file(0, "sha256", H[:31]),
    "sha256 as text": _file(0, "sha256", H.hex()),
    "piece over max_piece": _file(0, "pieces", [[0, 9, H], [9, 8, H], [17, 3, H]]),
    "zero-length piece": _file(1, "pieces", [[0, 0, H], [0, 3, H]]),
    "pieces with a gap": _file(0, "pieces", [[0, 8, H], [9, 8, H], [17, 3, H]]),
    "pieces overlapping": _file(0, "pieces", [[0, 8, H], [7, 8, H], [15, 5, H]]),
    "piece with two fields": _file(1, "pieces", [[0, 3]]),
    "piece hash too short": _file(1, "pieces", [[0, 3, H[:16]]]),
    "piece offset as bool": _file(1, "pieces", [[False, 3, H]]),
    "files out of order": lambda v: v["files"].reverse(),
    "parent of 31 bytes": _set("parent", H[:31]),
    "parent as nil": _set("parent", None),
    "variant naming an unknown file": _set("variants", [{"name": "v", "files": ["zzz"], "requirements": {}}]),
    "variant with no files": _set("variants", [{"name": "v", "files": [], "requirements": {}}]),
    "variant listing a file twice": _set("variants", [{"name": "v", "files": ["a.bin", "a.bin"], "requirements": {}}]),
    "variant with unknown requirement": _set(
        "variants", [{"name": "v", "files": ["a.bin"], "requirements": {"gpu_count": 2}}]
    ),
    "variant requirement negative": _set(
        "variants", [{"name": "v", "files": ["a.bin"], "requirements": {"min_ram": -1}}]
    ),
    "two variants with one name": _set(
        "variants",
        [{"name": "v", "files": ["a.bin"], "requirements": {}}, {"name": "v", "files": ["b/c.bin"], "requirements": {}}],
    ),
    "variant missing requirements": _set("variants", [{"name": "v", "files": ["a.bin"]}]),
}


@pytest.mark.parametrize("what", sorted(MUTATIONS))
def test_schema_violation_refused(what: str) -> None:
    v = raw()
    MUTATIONS[what](v)
    with pytest.raises(RemoteProtocolError, match="invalid manifest|unsupported format"):
        decode_manifest(encode_canonical(v))


def test_top_level_must_be_a_map() -> None:
    for value in ([1, 2], "manifest", 1, None):
        with pytest.raises(RemoteProtocolError):
            decode_manifest(encode_canonical(value))


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        (ManifestLimits(max_files=1), "more than 1 files"),
        (ManifestLimits(max_pieces=3), "more than 3 pieces"),
        (ManifestLimits(max_piece_size=4), "max_piece"),
        (ManifestLimits(max_total_size=22), "total size"),
        (ManifestLimits(max_total_size=19), "size"),
        (ManifestLimits(max_bytes=100), "limit"),
    ],
)
def test_limits_refused(limits: ManifestLimits, match: str) -> None:
    data = base_manifest().encode()
    decode_manifest(data, ManifestLimits(max_files=2, max_pieces=4, max_total_size=23, max_bytes=len(data)))
    with pytest.raises(RemoteProtocolError, match=match):
        decode_manifest(data, limits)


def test_too_many_variants_refused() -> None:
    v = raw()
    v["variants"] = [{"name": f"v{i}", "files": ["a.bin"], "requirements": {}} for i in range(3)]
    data = encode_canonical(v)
    assert len(decode_manifest(data, ManifestLimits(max_variants=3)).variants) == 3
    with pytest.raises(RemoteProtocolError, match="more than 2 variants"):
        decode_manifest(data, ManifestLimits(max_variants=2))


def test_many_pieces_within_default_limits_decode_quickly() -> None:
    n = 50_000
    pieces = tuple(Piece(i, 1, H) for i in range(n))
    m = Manifest("big", "1", 0, "p", (FileEntry("f", n, H, pieces),), max_piece_size=1)
    assert decode_manifest(m.encode()).piece_count == n
    with pytest.raises(RemoteProtocolError):
        decode_manifest(m.encode(), ManifestLimits(max_pieces=n - 1))


def test_validate_raises_local_error_for_a_bad_typed_manifest() -> None:
    bad = Manifest("m", "1", 0, "p", (FileEntry("../x", 0, H, ()),))
    with pytest.raises(LocalProtocolError, match="'..'"):
        bad.validate()
