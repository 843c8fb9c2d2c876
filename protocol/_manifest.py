"""Manifest format v1: data model, canonical encoding and the strict decoder.

The manifest is the root of trust: every byte a node accepts is checked
against a piece hash listed here. See docs/manifest.md for the byte layout.

Strategy: the decoder first insists on canonical msgpack (so the id, a hash
of the bytes, is unique for a manifest), then checks the schema field by
field, and finally re-encodes the typed value and compares: anything the typed
model cannot represent exactly is refused rather than silently dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ._codec import Limits, decode_canonical, encode_canonical
from ._errors import LocalProtocolError, RemoteProtocolError
from ._paths import check_path, check_unique_paths

__all__ = [
    "DEFAULT_MAX_PIECE_SIZE",
    "FORMAT_VERSION",
    "FileEntry",
    "Manifest",
    "ManifestLimits",
    "Piece",
    "Requirements",
    "Variant",
    "decode_manifest",
]

FORMAT_VERSION = 1
#: Default cap on one piece. See docs/manifest.md ("Piece size") for why 8 MiB.
DEFAULT_MAX_PIECE_SIZE = 8 * 1024 * 1024
HASH_LEN = 32
_MAX_LABEL = 128


@dataclass(frozen=True, slots=True)
class ManifestLimits:
    """Caps the decoder enforces on untrusted manifests."""

    max_bytes: int = 128 * 1024 * 1024
    max_files: int = 100_000
    max_pieces: int = 2_000_000
    max_total_size: int = 1 << 50  # 1 PiB
    max_piece_size: int = 256 * 1024 * 1024
    max_variants: int = 64


@dataclass(frozen=True, slots=True)
class Piece:
    """A byte range of one file and the BLAKE3 hash of its bytes."""

    offset: int
    length: int
    hash: bytes

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a model: relative path, size, SHA-256 and its pieces."""

    path: str
    size: int
    sha256: bytes
    pieces: tuple[Piece, ...]


@dataclass(frozen=True, slots=True)
class Requirements:
    """What a device needs to run a variant. ``None`` means no requirement."""

    min_ram: int | None = None
    min_accel_mem: int | None = None
    accel: str | None = None
    dtype: str | None = None


@dataclass(frozen=True, slots=True)
class Variant:
    """A named subset of the files (e.g. ``fp16`` or ``q4-gguf``) with requirements."""

    name: str
    files: tuple[str, ...]
    requirements: Requirements = Requirements()


@dataclass(frozen=True, slots=True)
class Manifest:
    """The unsigned manifest. Encode with :meth:`encode`; its id is SHA-256 of that."""

    name: str
    version: str
    created_at: int
    publisher: str
    files: tuple[FileEntry, ...]
    variants: tuple[Variant, ...] = ()
    parent: bytes | None = None
    max_piece_size: int = DEFAULT_MAX_PIECE_SIZE
    _encoded: bytes = field(default=b"", init=False, repr=False, compare=False)

    def to_value(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at,
            "publisher": self.publisher,
            "max_piece": self.max_piece_size,
            "files": [
                {
                    "path": f.path,
                    "size": f.size,
                    "sha256": f.sha256,
                    "pieces": [[p.offset, p.length, p.hash] for p in f.pieces],
                }
                for f in self.files
            ],
            "variants": [_variant_value(v) for v in self.variants],
        }
        if self.parent is not None:
            value["parent"] = self.parent
        return value

    def encode(self) -> bytes:
        """The canonical bytes (cached: a manifest is immutable)."""
        if not self._encoded:
            object.__setattr__(self, "_encoded", encode_canonical(self.to_value()))
        return self._encoded

    @property
    def id(self) -> bytes:
        """SHA-256 of the canonical encoding: the manifest id."""
        return hashlib.sha256(self.encode()).digest()

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def piece_count(self) -> int:
        return sum(len(f.pieces) for f in self.files)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def iter_pieces(self) -> Iterator[tuple[FileEntry, Piece]]:
        for f in self.files:
            for p in f.pieces:
                yield f, p

    def validate(self, limits: ManifestLimits = ManifestLimits()) -> None:
        """Raise LocalProtocolError if this manifest would not decode."""
        try:
            decode_manifest(self.encode(), limits)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(str(exc)) from exc


def _variant_value(v: Variant) -> dict[str, Any]:
    req = {k: getattr(v.requirements, k) for k in _REQ_KEYS if getattr(v.requirements, k) is not None}
    return {"name": v.name, "files": list(v.files), "requirements": req}


_TOP_KEYS = {"format", "name", "version", "created_at", "publisher", "max_piece", "files", "variants"}
_REQ_KEYS = ("min_ram", "min_accel_mem", "accel", "dtype")


def _fail(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"invalid manifest: {msg}")


def _get(m: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    if key not in m:
        raise _fail(f"{what} has no {key!r}")
    v = m[key]
    if isinstance(v, bool) or not isinstance(v, typ):
        raise _fail(f"{what} field {key!r} has the wrong type")
    return v


def _label(m: dict[str, Any], key: str, what: str, max_len: int = _MAX_LABEL) -> str:
    s: str = _get(m, key, str, what)
    if not s or len(s) > max_len or any(ord(c) < 0x20 for c in s):
        raise _fail(f"{what} field {key!r} must be 1..{max_len} printable characters")
    return s


def _uint(m: dict[str, Any], key: str, what: str, maximum: int) -> int:
    v: int = _get(m, key, int, what)
    if v < 0 or v > maximum:
        raise _fail(f"{what} field {key!r} is out of range")
    return v


def _hash(v: Any, what: str) -> bytes:
    if not isinstance(v, bytes) or len(v) != HASH_LEN:
        raise _fail(f"{what} is not a {HASH_LEN}-byte hash")
    return v


def _decode_file(raw: Any, index: int, max_piece: int, limits: ManifestLimits, budget: list[int]) -> FileEntry:
    what = f"file #{index}"
    if not isinstance(raw, dict):
        raise _fail(f"{what} is not a map")
    if set(raw) != {"path", "size", "sha256", "pieces"}:
        raise _fail(f"{what} has unexpected or missing fields")
    try:
        path = check_path(_get(raw, "path", str, what))
    except RemoteProtocolError as exc:
        raise _fail(str(exc)) from exc
    what = f"file {path!r}"
    size = _uint(raw, "size", what, limits.max_total_size)
    sha = _hash(raw["sha256"], f"{what} sha256")
    raw_pieces = _get(raw, "pieces", list, what)
    budget[0] -= len(raw_pieces)
    if budget[0] < 0:
        raise _fail(f"more than {limits.max_pieces} pieces")
    pieces: list[Piece] = []
    pos = 0
    for p in raw_pieces:
        if not isinstance(p, list) or len(p) != 3:
            raise _fail(f"{what} has a malformed piece")
        off, length, h = p
        if isinstance(off, bool) or isinstance(length, bool) or not isinstance(off, int) or not isinstance(length, int):
            raise _fail(f"{what} has a malformed piece")
        if off != pos:
            raise _fail(f"{what} pieces are not contiguous at offset {pos}")
        if not 1 <= length <= max_piece:
            raise _fail(f"{what} has a piece of {length} bytes (limit {max_piece})")
        pieces.append(Piece(off, length, _hash(h, f"{what} piece hash")))
        pos += length
    if pos != size:
        raise _fail(f"{what} pieces cover {pos} bytes but the file has {size}")
    return FileEntry(path, size, sha, tuple(pieces))


def _decode_variant(raw: Any, paths: set[str]) -> Variant:
    if not isinstance(raw, dict) or set(raw) != {"name", "files", "requirements"}:
        raise _fail("a variant has unexpected or missing fields")
    name = _label(raw, "name", "variant", 64)
    files = _get(raw, "files", list, f"variant {name!r}")
    if not files:
        raise _fail(f"variant {name!r} lists no files")
    for f in files:
        if not isinstance(f, str) or f not in paths:
            raise _fail(f"variant {name!r} names a file the manifest does not list")
    if len(set(files)) != len(files):
        raise _fail(f"variant {name!r} lists a file twice")
    req = _get(raw, "requirements", dict, f"variant {name!r}")
    if not set(req) <= set(_REQ_KEYS):
        raise _fail(f"variant {name!r} has unknown requirements {sorted(set(req) - set(_REQ_KEYS))}")
    what = f"variant {name!r} requirements"
    r = Requirements(
        min_ram=_uint(req, "min_ram", what, 1 << 60) if "min_ram" in req else None,
        min_accel_mem=_uint(req, "min_accel_mem", what, 1 << 60) if "min_accel_mem" in req else None,
        accel=_label(req, "accel", what, 32) if "accel" in req else None,
        dtype=_label(req, "dtype", what, 32) if "dtype" in req else None,
    )
    return Variant(name, tuple(files), r)


def decode_manifest(data: bytes, limits: ManifestLimits = ManifestLimits()) -> Manifest:
    """Parse canonical manifest bytes, enforcing every limit and path rule.

    Raises RemoteProtocolError for anything else; never another exception.
    """
    codec_limits = Limits(
        max_bytes=limits.max_bytes,
        max_str_len=64 * 1024,
        max_bin_len=HASH_LEN,
        max_array_len=max(limits.max_files, limits.max_pieces),
        max_map_len=16,
    )
    value = decode_canonical(data, codec_limits)
    if not isinstance(value, dict):
        raise _fail("top level is not a map")
    keys = set(value)
    if not _TOP_KEYS <= keys or not keys <= _TOP_KEYS | {"parent"}:
        raise _fail(f"unexpected or missing top-level fields {sorted(keys ^ _TOP_KEYS)}")
    if value["format"] != FORMAT_VERSION or isinstance(value["format"], bool):
        raise _fail(f"unsupported format version {value['format']!r}")
    name = _label(value, "name", "manifest")
    version = _label(value, "version", "manifest")
    created_at = _uint(value, "created_at", "manifest", 1 << 40)
    publisher = _label(value, "publisher", "manifest", 64)
    max_piece = _uint(value, "max_piece", "manifest", limits.max_piece_size)
    if max_piece < 1:
        raise _fail("max_piece must be positive")
    raw_files = _get(value, "files", list, "manifest")
    if not raw_files:
        raise _fail("no files")
    if len(raw_files) > limits.max_files:
        raise _fail(f"more than {limits.max_files} files")
    budget = [limits.max_pieces]
    files = tuple(_decode_file(f, i, max_piece, limits, budget) for i, f in enumerate(raw_files))
    if any(a.path.encode() >= b.path.encode() for a, b in zip(files, files[1:], strict=False)):
        raise _fail("files are not sorted by path")
    try:
        check_unique_paths(f.path for f in files)
    except RemoteProtocolError as exc:
        raise _fail(str(exc)) from exc
    if sum(f.size for f in files) > limits.max_total_size:
        raise _fail("total size over the limit")
    raw_variants = _get(value, "variants", list, "manifest")
    if len(raw_variants) > limits.max_variants:
        raise _fail(f"more than {limits.max_variants} variants")
    paths = {f.path for f in files}
    variants = tuple(_decode_variant(v, paths) for v in raw_variants)
    if len({v.name for v in variants}) != len(variants):
        raise _fail("two variants share a name")
    parent = _hash(value["parent"], "parent id") if "parent" in value else None
    m = Manifest(name, version, created_at, publisher, files, variants, parent, max_piece)
    if m.encode() != data:
        raise _fail("manifest does not round-trip to the same bytes")
    return m
