"""What one fetch counts, and the progress snapshots made from it.

:class:`FetchStats` keeps the numbers of a fetch: bytes verified per source and
per file (the result), body bytes each source received (what its own log
shows), bytes handed to writers (the display's rate), and bytes that failed or
lost an endgame race (refetched). The engine's parts feed it; it computes
nothing on its own but the estimates a display needs (:meth:`buffered_by_file`)
and, in :meth:`run_ticker`, sends a :class:`ProgressSnapshot` every interval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, cast, runtime_checkable

import trio

from autoglm.node._progress import ProgressSnapshot
from autoglm.node._sources import PieceRef, Source

__all__ = ["FetchStats", "rx_count"]


@runtime_checkable
class _Counting(Protocol):
    """A source that counts the body bytes it received, used or not (mirrors, peers)."""

    @property
    def bytes_received(self) -> int: ...


# Source type -> whether it is _Counting. isinstance against a runtime-checkable
# Protocol walks every attribute of the class each time (~20 us, 1.2M str.startswith
# calls per node in an N=8 swarm run); the answer depends on the source's type only.
_COUNTS: dict[type, bool] = {}


def rx_count(src: Source) -> int:
    """Bytes the source has received so far, where it counts them (mirrors, peers)."""
    counts = _COUNTS.get(type(src))
    if counts is None:
        counts = _COUNTS[type(src)] = isinstance(src, _Counting)
    return cast(_Counting, src).bytes_received if counts else 0


class FetchStats:
    """The counters of one fetch. Plain data, touched only from the fetch's trio tasks."""

    def __init__(self, refs: Sequence[PieceRef]) -> None:
        self._refs = refs
        self.received = 0  # body bytes handed to writers, used or not
        self.discarded = 0  # bytes that failed their hash or lost an endgame race
        self.bytes_done = 0
        self.bytes_by_source: dict[str, int] = {}
        self.received_by_source: dict[str, int] = {}  # sources already removed
        self.by_file: dict[str, int] = {}
        # Progress display only: body bytes each source handed to writers, and the
        # part of its received count that never reached one (see buffered_by_file).
        self._handed: dict[str, int] = {}
        self._unhanded_base: dict[str, int] = {}
        self._rx_base: dict[str, int] = {}

    def handed(self, source_id: str, n: int) -> None:
        """``n`` body bytes of ``source_id`` reached a writer."""
        self.received += n
        self._handed[source_id] = self._handed.get(source_id, 0) + n

    def verified(self, source_id: str, index: int) -> int:
        """Piece ``index`` from ``source_id`` is committed; returns its length."""
        ref = self._refs[index]
        self.bytes_done += ref.length
        self.bytes_by_source[source_id] = self.bytes_by_source.get(source_id, 0) + ref.length
        self.by_file[ref.path] = self.by_file.get(ref.path, 0) + ref.length
        return ref.length

    def track(self, src: Source) -> None:
        """Count what ``src`` receives from now on."""
        self._rx_base[src.id] = rx_count(src)

    def settle(self, src: Source) -> None:
        """``src`` is gone (or the fetch ended): keep what it received."""
        n = rx_count(src) - self._rx_base.pop(src.id, 0)
        if n > 0:
            self.received_by_source[src.id] = self.received_by_source.get(src.id, 0) + n

    def received_now(self, sources: Iterable[Source]) -> dict[str, int]:
        """Body bytes each source has sent so far, sources already removed included."""
        rx = dict(self.received_by_source)
        for src in sources:
            n = rx_count(src) - self._rx_base.get(src.id, 0)
            if n > 0:
                rx[src.id] = rx.get(src.id, 0) + n
        return rx

    def buffered_by_file(self, sources: Iterable[Source], missing: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
        """Bytes a source has received but not yet handed to a writer, spread over its requests' files.

        A mirror fills a large buffer before it hands bytes over, and on a slow
        link many connections each hold a partly filled one. An estimate for a
        display: a source's received bytes minus those it handed over, capped by
        what its requests still miss (``missing``: source id -> path -> bytes,
        empty for an idle source); re-based whenever the source is idle, so
        bytes it skipped (a whole-file body) do not add up.
        """
        out: dict[str, int] = {}
        for src in sources:
            sid = src.id
            unhanded = rx_count(src) - self._rx_base.get(sid, 0) - self._handed.get(sid, 0)
            if sid not in missing:
                self._unhanded_base[sid] = unhanded
                continue
            extra = unhanded - self._unhanded_base.get(sid, 0)
            left = sum(missing[sid].values())
            if extra <= 0 or not left:
                continue
            extra = min(extra, left)
            for path, n in missing[sid].items():
                out[path] = out.get(path, 0) + extra * n // left
        return out

    def snapshot(self, total: int, rate: float, in_flight: dict[str, int], rx: dict[str, int]) -> ProgressSnapshot:
        return ProgressSnapshot(self.bytes_done, total, self.received, rate, dict(self.bytes_by_source),
                                dict(self.by_file), in_flight, rx)

    async def run_ticker(self, interval: float, sources: Callable[[], Iterable[Source]],
                         snapshot: Callable[[float], ProgressSnapshot], send: Callable[[ProgressSnapshot], None]) -> None:
        """Every ``interval``: a snapshot with the receive rate (a moving average) to ``send``."""

        def count() -> int:  # bytes off the wire (sources count them as they arrive), else as handed over
            return max(self.received, sum(self.received_now(sources()).values()))

        last_t, last_b = trio.current_time(), count()
        rate = 0.0
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            received = count()
            inst = (received - last_b) / max(now - last_t, 1e-9)
            rate = inst if rate == 0.0 else 0.6 * rate + 0.4 * inst
            last_t, last_b = now, received
            send(snapshot(rate))
