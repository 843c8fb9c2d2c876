"""Events a fetch sends over its progress channel (frozen, slotted dataclasses).

The CLI renders them (rich bars or ``--json`` lines); the swarm turns
:class:`PieceVerified` into HAVE messages. ``to_json`` gives the ``--json`` form.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "Event",
    "FetchDone",
    "FetchStarted",
    "FileDone",
    "PieceVerified",
    "ProgressSnapshot",
    "SourceFailed",
    "from_json",
    "to_json",
]


@dataclass(frozen=True, slots=True)
class FetchStarted:
    manifest_id: str
    name: str
    version: str
    out_dir: str
    files: tuple[tuple[str, int], ...]  # (path, size) of the wanted files
    bytes_total: int
    bytes_present: int  # already verified before this run (resume, local copies not included)
    sources: tuple[str, ...]
    present_by_file: dict[str, int] = field(default_factory=dict)  # verified bytes per file at the start (local copies included)


@dataclass(frozen=True, slots=True)
class PieceVerified:
    """A piece matched its hash and is durable: it counts, and may be served."""

    manifest_id: bytes
    index: int
    source_id: str
    nbytes: int
    path: str


@dataclass(frozen=True, slots=True)
class FileDone:
    path: str
    size: int


@dataclass(frozen=True, slots=True)
class SourceFailed:
    source_id: str
    message: str
    integrity: bool = False  # the source sent bytes that failed the hash
    permanent: bool = False  # the source will not be asked for those pieces again


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    bytes_done: int
    bytes_total: int
    bytes_received: int  # includes bytes of pieces still in flight
    rate: float  # bytes/s over the last seconds
    by_source: dict[str, int] = field(default_factory=dict)
    by_file: dict[str, int] = field(default_factory=dict)  # committed (verified, durable) bytes per file
    # Bytes received for pieces not committed yet, per file: a display adds them
    # to by_file so a bar moves while a large piece streams in.
    in_flight_by_file: dict[str, int] = field(default_factory=dict)
    received_by_source: dict[str, int] = field(default_factory=dict)  # body bytes each source sent so far


@dataclass(frozen=True, slots=True)
class FetchDone:
    bytes_total: int
    bytes_by_source: dict[str, int]
    seconds: float
    refetched_bytes: int
    out_dir: str
    received_by_source: dict[str, int] = field(default_factory=dict)  # every body byte each source sent


Event = FetchStarted | PieceVerified | FileDone | SourceFailed | ProgressSnapshot | FetchDone

_NAMES = {
    FetchStarted: "start",
    PieceVerified: "piece",
    FileDone: "file",
    SourceFailed: "source_failed",
    ProgressSnapshot: "progress",
    FetchDone: "done",
}


# Field names per event type. to_json runs for every verified piece a fetch
# reports (the control API relays each one): a flat copy of the fields, not
# dataclasses.asdict's recursive deep copy (the fields are flat: numbers,
# strings, bytes, tuples, dicts of numbers).
_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in _NAMES}


def to_json(ev: Event) -> dict[str, Any]:
    d: dict[str, Any] = {"event": _NAMES[type(ev)]}
    for k in _FIELDS[type(ev)]:
        v = getattr(ev, k)
        if isinstance(v, bytes):
            v = v.hex()
        elif isinstance(v, dict):
            v = dict(v)
        d[k] = v
    if isinstance(ev, ProgressSnapshot | FetchDone):
        for k in ("rate", "seconds"):
            if k in d:
                d[k] = round(d[k], 3)
    return d


_TYPES = {name: cls for cls, name in _NAMES.items()}


def from_json(d: dict[str, Any]) -> Event | None:
    """Inverse of :func:`to_json` (for events relayed by a running node); None if unknown."""
    cls = _TYPES.get(str(d.get("event")))
    if cls is None:
        return None
    fields = {k: v for k, v in d.items() if k != "event"}
    try:
        if cls is FetchStarted:
            fields["files"] = tuple((str(p), int(n)) for p, n in fields["files"])
            fields["sources"] = tuple(fields["sources"])
        elif cls is PieceVerified:
            fields["manifest_id"] = bytes.fromhex(fields["manifest_id"])
        return cls(**fields)  # type: ignore[no-any-return]
    except (KeyError, TypeError, ValueError):
        return None
