"""Hypothesis strategies for valid manifests and canonical msgpack values.

Imported by the protocol tests (pytest puts this directory on sys.path).
"""

from __future__ import annotations

from hypothesis import strategies as st

from autoglm.protocol import (
    FileEntry,
    Manifest,
    Piece,
    RemoteProtocolError,
    Requirements,
    Variant,
    check_path,
    check_unique_paths,
)

HASHES = st.binary(min_size=32, max_size=32)
_SEG_ALPHABET = "abcXYZ019_-.é日Ωß"


def _valid_path(p: str) -> bool:
    try:
        check_path(p)
    except RemoteProtocolError:
        return False
    return True


def _unique(paths: list[str]) -> bool:
    try:
        check_unique_paths(paths)
    except RemoteProtocolError:
        return False
    return True


segments = st.text(alphabet=_SEG_ALPHABET, min_size=1, max_size=8)
paths = st.lists(segments, min_size=1, max_size=3).map("/".join).filter(_valid_path)
path_sets = st.lists(paths, min_size=1, max_size=5, unique=True).filter(_unique)


def labels(max_len: int) -> st.SearchStrategy[str]:
    """1..max_len characters, none below U+0020, no surrogates (the decoder's rule)."""
    return st.text(
        alphabet=st.characters(min_codepoint=0x20, exclude_categories=("Cs",)), min_size=1, max_size=max_len
    )


@st.composite
def file_entries(draw: st.DrawFn, path: str, max_piece: int) -> FileEntry:
    lengths = draw(st.lists(st.integers(1, max_piece), max_size=6))
    pieces, pos = [], 0
    for n in lengths:
        pieces.append(Piece(pos, n, draw(HASHES)))
        pos += n
    return FileEntry(path, pos, draw(HASHES), tuple(pieces))


requirements = st.builds(
    Requirements,
    min_ram=st.none() | st.integers(0, 1 << 60),
    min_accel_mem=st.none() | st.integers(0, 1 << 60),
    accel=st.none() | labels(32),
    dtype=st.none() | labels(32),
)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    max_piece = draw(st.integers(1, 1 << 24) | st.sampled_from([1, 16, 8 << 20]))
    piece_cap = min(max_piece, 1 << 20)
    ps = sorted(draw(path_sets), key=lambda s: s.encode())
    files = tuple(draw(file_entries(p, piece_cap)) for p in ps)
    names = draw(st.lists(labels(64), max_size=3, unique=True))
    variants = tuple(
        Variant(n, tuple(draw(st.lists(st.sampled_from(ps), min_size=1, unique=True))), draw(requirements))
        for n in names
    )
    return Manifest(
        name=draw(labels(128)),
        version=draw(labels(128)),
        created_at=draw(st.integers(0, 1 << 40)),
        publisher=draw(labels(64)),
        files=files,
        variants=variants,
        parent=draw(st.none() | HASHES),
        max_piece_size=max_piece,
    )


canonical_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=8), children, max_size=5),
    max_leaves=30,
)
