"""Sources of piece bytes: the one interface between the fetch engine and mirrors, peers, local copies.

Theory of operation
-------------------
A fetch is one manifest (or a subset of its files) being assembled in the
local store. Pieces are numbered by their order in ``manifest.iter_pieces()``
(index 0 is the first piece of the first file), the same numbering as the
store's bitfields and the swarm's HAVE messages.

The engine (``node/_engine.py``) owns a pure :class:`~autoglm.protocol._picker.PiecePicker`.
Its loop is *decide synchronously, then do IO*: for each source with spare
capacity it asks the picker for a request (a run of piece indices), starts
``source.fetch(request, sink)`` in a nursery, and goes back to waiting for
results. A source never chooses pieces itself.

A source:

* has a stable ``id`` (``"mirror:https://host/path/"``, ``"peer:<peer id>"``)
  and a ``kind`` (:class:`SourceKind`); the picker prefers peers to mirrors and
  asks mirrors for contiguous runs (web-seed style);
* says which pieces it can serve: ``availability()`` returns ``None`` for
  "everything" (mirrors) or a set of indices.  A peer's set changes while a
  fetch runs: push each change with ``Fetch.source_have(id, index)`` or
  ``Fetch.source_bitfield(id, indices)`` (see ``node/_engine.py``), so the
  picker's rarest-first counts stay exact;
* says how many requests it can take now (``max_requests()``), how big a
  request may be (``max_request_bytes()``) and when it may be used again after
  a failure (``ready_at()``, trio time; the engine does not start requests on a
  source before that instant);
* fetches in ``async fetch(request, sink)``: for each piece of the request it
  hands the bytes to the sink, either whole (``await sink.put(index, data)``)
  or streamed (``w = sink.open_piece(index)``; ``await w.write(chunk)`` ...;
  ``await w.finish()``).  The sink verifies the BLAKE3 hash and writes the
  bytes into the staging file; the piece is *done* only after the bytes are
  durable (the store's group commit), at which point the engine publishes a
  :class:`~autoglm.node._progress.PieceVerified` event (the swarm turns it into
  HAVE messages).

Errors (the one tree in ``node/errors.py``):

* a hash mismatch makes the sink raise :class:`IntegrityError`; a source must
  let it propagate out of ``fetch``.  The engine then never asks this source
  for that piece again and demotes it (mirrors: score penalty; peers: the swarm
  should ban the peer for the manifest when it sees
  :class:`~autoglm.node._progress.SourceFailed` with ``integrity=True``);
* network trouble raises :class:`SourceError` (``MirrorError`` for mirrors);
  the pieces not yet delivered go back to the picker and are retried
  elsewhere, or from the same source after its ``ready_at()``;
* :class:`StorageError` / :class:`DiskFullError` from the sink abort the whole
  fetch; every piece already committed is kept.
* A source must be cancellable at any await (the engine cancels duplicate
  endgame requests once a piece is done, and everything on Ctrl-C).

Sources can be added and removed while a fetch runs (``Fetch.add_source``,
``Fetch.remove_source``): requests in flight on a removed source are
cancelled and their pieces go back to the picker.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from autoglm.protocol._picker import SourceKind  # one SourceKind: the picker's

__all__ = ["FetchRequest", "PieceRef", "PieceSink", "PieceWriter", "Source", "SourceKind"]


@dataclass(frozen=True, slots=True)
class PieceRef:
    """One piece as a source needs it: its global index and where it lies in its file."""

    index: int
    path: str
    offset: int
    length: int
    hash: bytes
    file_size: int


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """What the engine asks one source for.

    For mirrors the pieces are one contiguous run inside one file, so a single
    Range request covers them. For peers they are any pieces the peer has.
    """

    manifest_id: bytes
    pieces: tuple[PieceRef, ...]
    #: Bytes at the start of the first piece that are already on disk (a fetch killed mid-piece).
    #: A source may start after them and pass ``skip`` to ``open_piece``; it may also ignore it.
    skip: int = 0

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.pieces)


class PieceWriter(Protocol):
    """A piece being streamed into the store. Chunks arrive in order, from the piece's start."""

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Hash and write a chunk. Big chunks (hundreds of KiB and up) are handled in a worker
        thread, so pass large blocks; ``chunk`` must stay unchanged until this returns."""

    async def finish(self) -> None:
        """All bytes written: check the hash (IntegrityError on mismatch) and queue the commit."""

    def abort(self) -> None:
        """Give up on this piece (the bytes written so far are ignored)."""


class PieceSink(Protocol):
    """Where a source delivers bytes. Implemented by the engine on top of the store."""

    async def put(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Verify and store a whole piece. IntegrityError on a hash mismatch."""

    def open_piece(self, index: int, skip: int = 0) -> PieceWriter:
        """Start streaming one piece. ``skip``: the source sends from this byte of the piece
        (only the ``FetchRequest.skip`` of the first piece); the sink supplies the bytes before."""

    def take(self, index: int) -> bool:
        """Take on a piece that was not requested (e.g. a mirror that ignores Range streams the
        whole file). True when the piece is still needed and is now this source's to deliver."""

    def file_pieces(self, path: str) -> Sequence[PieceRef]:
        """Every piece of a file of the manifest, in order (to map a whole-file body to pieces)."""

    def wake(self) -> None:
        """Ask the engine to look again at ``max_requests()`` now (the source's capacity grew)."""


@runtime_checkable
class Source(Protocol):
    """A provider of pieces: an HTTP mirror, a peer, a local copy. See the module docstring."""

    @property
    def id(self) -> str: ...

    @property
    def kind(self) -> SourceKind: ...

    def availability(self) -> Collection[int] | None:
        """Piece indices this source can serve; ``None`` means all of them."""
        ...

    def max_requests(self) -> int:
        """How many ``fetch`` calls may run on this source at once, now (may adapt)."""
        ...

    def max_request_bytes(self) -> int:
        """Upper bound on the bytes of one request (the engine rounds to whole pieces, at least one)."""
        ...

    def ready_at(self) -> float:
        """Trio time before which no new request should start (backoff); 0.0 when ready."""
        ...

    async def fetch(self, request: FetchRequest, sink: PieceSink) -> None:
        """Deliver the request's pieces to ``sink``; raise SourceError or IntegrityError on failure."""
        ...

    async def aclose(self) -> None:
        """Release connections. Called once when the fetch ends or the source is removed."""
        ...
