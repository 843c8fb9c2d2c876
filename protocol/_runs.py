"""Mirror runs for the picker (rule 3): which contiguous pieces one Range request to a mirror should cover.

Theory of operation
-------------------
A mirror serves every piece, but each request costs a round trip, so it
gets one contiguous run inside one file (libtorrent's web-seed preference),
starting at the first piece of ``order`` it may take. Mirrors take pieces no
known peer holds (back to source); ``overlap_budget`` pieces held by some
peer may still come from a mirror (None: unlimited; the swarm uses 0 to
keep origin egress low), never in endgame. Which pieces are free, held and
allowed (first-copy ownership) is the picker's to say; this object keeps
the run boundaries, the start order and the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

__all__ = ["MirrorRuns"]


class MirrorRuns:
    """Run boundaries, start order and overlap budget of the mirror picks of one fetch."""

    def __init__(self, sizes: Sequence[int], file_starts: Iterable[int], order: Sequence[int], overlap_budget: int | None) -> None:
        self._sizes = sizes
        self._starts = set(file_starts)
        self._order = order
        self.overlap_budget = overlap_budget

    def break_at(self, indices: Iterable[int]) -> None:
        """Runs never continue into these pieces."""
        self._starts.update(indices)

    def pick(
        self,
        max_bytes: int,
        *,
        free: Callable[[int], bool],
        held: Sequence[int],
        any_unheld: bool,
        endgame: bool,
    ) -> list[int]:
        """One run: ``free`` pieces (pickable from the mirror and allowed now); ``held``: peer count per piece.

        Pieces no peer holds first (``any_unheld``: some open piece is such);
        else, outside ``endgame``, up to the overlap budget of held ones.
        """
        n, sizes = len(self._sizes), self._sizes
        start = next((i for i in self._order if held[i] == 0 and free(i)), None) if any_unheld else None
        overlap = False
        if start is None and (self.overlap_budget is None or self.overlap_budget > 0) and not endgame:
            start = next((i for i in self._order if free(i)), None)
            overlap = True
        if start is None:
            return []
        run = [start]
        total = sizes[start]
        i = start + 1
        while i < n and i not in self._starts and free(i):
            if not overlap and held[i] > 0:
                break
            if total + sizes[i] > max_bytes:
                break
            run.append(i)
            total += sizes[i]
            i += 1
        if overlap and self.overlap_budget is not None:
            run = run[: self.overlap_budget]
            self.overlap_budget -= len(run)
        return run
