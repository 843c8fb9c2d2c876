"""Local places a fetch can take pieces from before any network source: the local sources.

Pieces are content-addressed (BLAKE3 per piece), so a new version's piece may
already lie on this machine:

* ``local:store``: anywhere in the store (any earlier model, any file), found
  by hash in the store's index;
* ``local:out``: in the output directory being updated, the old version's
  files in place. With no record of the old version, candidate byte ranges of
  each old file are hashed: the new piece's own range (an edit in place), and
  the ranges the publisher's piece planner gives for the old file (tensor-,
  member- or content-defined, so a tensor that moved still matches);
* ``local:hf``: in the Hugging Face cache (the root ``node/hub/_cache.py``
  finds): a blob named by a file's SHA-256 is that file; the blobs of files
  with the same name in any cached repository are scanned like old files.

:func:`find_local_pieces` (blocking) builds the candidate map once, before the
first request; :class:`LocalSource` is a :class:`~autoglm.node._sources.Source`
of kind ``LOCAL`` over it. The engine ranks local sources first and lets them
claim all their pieces at once, so the network is asked only for the rest,
and both run in parallel. A local file is not trusted either: the source
re-reads and re-hashes each piece (trying the next candidate on a mismatch),
and the engine's writer checks the hash again like any other piece's. A piece
with no good candidate is refused (``PieceHashMismatch``), so the picker
hands it to the network.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import blake3
import trio

from autoglm.node._delivery import PieceHashMismatch
from autoglm.node._sources import FetchRequest, PieceSink, SourceKind
from autoglm.node._staging import PARTIAL_DIR, drop_cache, pread_nofollow
from autoglm.node._store import UNKNOWN_HASH
from autoglm.node.errors import AutoglmError

if TYPE_CHECKING:
    from autoglm.node._store import Download, Store

__all__ = ["HF_ID", "OUT_ID", "STORE_ID", "LocalSource", "Spot", "find_local_pieces", "scan_file"]

log = logging.getLogger(__name__)

STORE_ID, OUT_ID, HF_ID = "local:store", "local:out", "local:hf"
#: Candidate files scanned per wanted file in the Hugging Face cache (each costs a read).
MAX_HF_CANDIDATES = 8
READERS = 4  # requests a local source runs at once (a thread each)


@dataclass(frozen=True, slots=True)
class Spot:
    """Bytes that may be a piece: ``length`` bytes at ``offset`` of ``path`` (re-checked when read)."""

    path: Path
    offset: int


def find_local_pieces(store: Store, d: Download, hf_cache: Path | None) -> dict[str, dict[int, list[Spot]]]:
    """Candidate spots for each missing piece, per local source id. Blocking: reads and hashes old files."""
    missing = [i for i in d.missing() if d.pieces[i].hash != UNKNOWN_HASH]
    if not missing:
        return {}
    want: dict[tuple[bytes, int], list[int]] = {}
    for i in missing:
        want.setdefault((d.pieces[i].hash, d.pieces[i].length), []).append(i)
    out: dict[str, dict[int, list[Spot]]] = {}
    found = _in_store(store, d, missing)
    if found:
        out[STORE_ID] = found
    left = {k: v for k, v in want.items() if not all(i in found for i in v)}
    found = _in_out_dir(d, left)
    if found:
        out[OUT_ID] = found
    left = {k: v for k, v in left.items() if not all(i in found for i in v)}
    if hf_cache is not None and left:
        found = _in_hf_cache(d, hf_cache, left)
        if found:
            out[HF_ID] = found
    return out


def _in_store(store: Store, d: Download, missing: list[int]) -> dict[int, list[Spot]]:
    out: dict[int, list[Spot]] = {}
    for i in missing:
        loc = store.find_by_hash(d.pieces[i].hash, d.id)
        if loc is not None:
            out[i] = [Spot(loc.path, loc.offset)]
    return out


def _in_out_dir(d: Download, want: dict[tuple[bytes, int], list[int]]) -> dict[int, list[Spot]]:
    """The old version's files in the output directory, at the paths the new version writes."""
    out: dict[int, list[Spot]] = {}
    for fi in d.wanted_files:
        if fi in d.complete_files or not want:
            continue
        f = d.manifest.files[fi]
        path = d.out_dir / f.path
        if PARTIAL_DIR in Path(f.path).parts:
            continue
        own = [(d.pieces[i].offset, d.pieces[i].length) for i in d.file_range(fi)]
        _merge(out, scan_file(path, want, own, d.manifest.max_piece_size))
    return out


def _in_hf_cache(d: Download, root: Path, want: dict[tuple[bytes, int], list[int]]) -> dict[int, list[Spot]]:
    """Blobs of the cache: a file's own blob (named by its SHA-256), else same-named files of any repository."""
    out: dict[int, list[Spot]] = {}
    try:
        repos = [p for p in root.iterdir() if p.is_dir() and "--" in p.name]
    except OSError:
        return out
    for fi in d.wanted_files:
        if fi in d.complete_files:
            continue
        f = d.manifest.files[fi]
        own = [(d.pieces[i].offset, d.pieces[i].length) for i in d.file_range(fi)]
        # (blob, the name it has in a snapshot: the planner goes by the file's suffix)
        candidates: list[tuple[Path, Path]] = []
        for repo in repos:
            blob = repo / "blobs" / f.sha256.hex()
            if blob.is_file():
                candidates.insert(0, (blob, Path(f.path)))
        name = Path(f.path).name
        for repo in repos:
            try:
                snaps = list((repo / "snapshots").iterdir())
            except OSError:
                continue
            for snap in snaps:
                p = snap / f.path if (snap / f.path).exists() else snap / name
                if p.exists():
                    candidates.append((p.resolve(), p))
        seen: set[Path] = set()
        for blob, named in candidates:
            if blob in seen or len(seen) >= MAX_HF_CANDIDATES:
                continue
            seen.add(blob)
            _merge(out, scan_file(blob, want, own, d.manifest.max_piece_size, plan_as=named))
    return out


def scan_file(path: Path, want: dict[tuple[bytes, int], list[int]], own: list[tuple[int, int]], max_piece: int,
              plan_as: Path | None = None) -> dict[int, list[Spot]]:
    """Hash candidate ranges of ``path``; returns the wanted pieces found, each at its spot.

    Candidates: ``own`` (the new file's piece ranges: bytes edited in place
    keep their offsets), then the ranges the publisher's planner gives for
    this file (a tensor or chunk that moved; ``plan_as``: a name that says
    its format, for a blob named by its hash). Only ranges whose length some
    wanted piece has are read; ``path`` is never read through a symlink.
    """
    try:
        st = path.stat()
    except OSError:
        return {}
    if not path.is_file():
        return {}
    lengths = {n for _, n in want}
    spans = [(o, n) for o, n in own if n in lengths and o + n <= st.st_size]
    try:
        from autoglm.node._publish import plan_file

        planned = plan_file(_named(path, plan_as), st.st_size, max_piece)
    except (AutoglmError, OSError, ValueError) as exc:
        log.debug("%s: not planned (%s); only same-offset ranges are compared", path, exc)
        planned = []
    seen = set(spans)
    spans += [s for s in planned if s[1] in lengths and s not in seen]
    out: dict[int, list[Spot]] = {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {}
    try:
        for off, n in spans:
            data = os.pread(fd, n, off)
            drop_cache(fd, off, n)  # read once to hash: keep the host's page cache for its own work
            for i in want.get((blake3.blake3(data).digest(), n), ()):
                out.setdefault(i, []).append(Spot(path, off))
    except OSError:
        pass
    finally:
        os.close(fd)
    return out


def _named(path: Path, plan_as: Path | None) -> Path:
    """``path`` as the planner should see it: the snapshot link when its suffix says more than the blob's name."""
    if plan_as is None or plan_as.suffix == path.suffix or not plan_as.exists():
        return path
    return plan_as if plan_as.resolve() == path.resolve() else path


def _merge(into: dict[int, list[Spot]], more: dict[int, list[Spot]]) -> None:
    for i, spots in more.items():
        into.setdefault(i, []).extend(s for s in spots if s not in into.get(i, ()))


class LocalSource:
    """Pieces read from files on this machine (kind ``LOCAL``), each re-hashed before it is handed over."""

    def __init__(self, source_id: str, spots: dict[int, list[Spot]], piece_lengths: Sequence[int]) -> None:
        self._id = source_id
        self._spots = {i: list(s) for i, s in spots.items()}
        # One schedule pass claims every local piece, before a network source is
        # asked: each of READERS requests takes more than a READERS-th of them.
        lengths = [piece_lengths[i] for i in spots]
        self._request_bytes = -(-sum(lengths) // READERS) + max(lengths, default=1)

    @property
    def id(self) -> str:
        return self._id

    @property
    def piece_count(self) -> int:
        """Pieces this source may still hold."""
        return sum(1 for s in self._spots.values() if s)

    @property
    def kind(self) -> SourceKind:
        return SourceKind.LOCAL

    def availability(self) -> Collection[int] | None:
        return set(self._spots)

    def max_requests(self) -> int:
        return READERS

    def max_request_bytes(self) -> int:
        return self._request_bytes

    def ready_at(self) -> float:
        return 0.0

    async def fetch(self, request: FetchRequest, sink: PieceSink) -> None:
        for ref in request.pieces:
            data = await trio.to_thread.run_sync(self._read, ref.index, ref.hash, ref.length)
            if data is None:
                raise PieceHashMismatch(f"piece {ref.index} ({ref.path} at byte {ref.offset}): no local copy matches its hash", ref.index)
            await sink.put(ref.index, data)

    def _read(self, index: int, piece_hash: bytes, length: int) -> bytes | None:
        """The first candidate whose bytes match; candidates that do not are dropped."""
        spots = self._spots.get(index, [])
        while spots:
            spot = spots[0]
            try:
                data = pread_nofollow(spot.path, spot.offset, length)
            except OSError:
                data = b""
            if len(data) == length and blake3.blake3(data).digest() == piece_hash:
                return data
            log.info("%s: %s at byte %d no longer holds piece %d; not used", self._id, spot.path, spot.offset, index)
            spots.pop(0)
        return None

    async def aclose(self) -> None:
        return None

