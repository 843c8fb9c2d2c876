"""Picker rule 6, the streaming order (protocol/_stream.py): tables, then properties.

Under a stream window, peers are asked for the front of each wanted file
first (a readahead window past its first missing piece), rarest first
beyond it; mirrors start their runs from the front of the files, within the
same first-copy ownership. Without a window the picker is unchanged (the
bench/picker_bench.py --check agreement with main covers that).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.protocol._ownership import FirstCopy
from autoglm.protocol._picker import MIRROR, PEER, PiecePicker, PieceState
from autoglm.protocol._stream import StreamOrder


def _finish(pp: PiecePicker, sid: str, indices: list[int]) -> None:
    for i in indices:
        pp.piece_written(sid, i)
        pp.piece_done(i)


def _two_files(window: int | None) -> PiecePicker:
    """Pieces 0-3 (file 0) and 4-7 (file 1), 100 bytes each; peer "all" holds all, "more" all but 3 and 7 (the rarest)."""
    pp = PiecePicker([100] * 8, [0, 4], stream_window=window)
    pp.add_source("all", PEER, range(8))
    pp.add_source("more", PEER, [0, 1, 2, 4, 5, 6])
    return pp


def test_without_a_window_peers_pick_rarest_first() -> None:
    pp = _two_files(None)
    assert [pp.pick("all", 1, 0.0)[0] for _ in range(8)] == [3, 7, 0, 1, 2, 4, 5, 6]


def test_the_window_comes_before_rarest_first_nearest_to_each_files_cursor_first() -> None:
    pp = _two_files(250)  # each window: the pieces starting less than 250 bytes past the cursor (3 pieces)
    assert [pp.pick("all", 1, 0.0)[0] for _ in range(6)] == [0, 4, 1, 5, 2, 6]
    assert [pp.pick("all", 1, 0.0)[0] for _ in range(2)] == [3, 7]  # nothing open in the windows: rarest first
    pp.check_invariant()


@pytest.mark.parametrize(
    ("done", "window", "expected"),
    [
        ([], 100, [0, 4]),  # a window of one piece per file
        ([0, 1], 250, [2, 4, 3, 5, 6]),  # file 0's cursor moved to 2; its window holds 2 and 3 only
        ([0, 1, 2, 3], 250, [4, 5, 6]),  # file 0 done: only file 1 streams
        ([4], 1000, [0, 5, 1, 6, 2, 7, 3]),  # a window past the file's end
    ],
)
def test_cursors_follow_the_done_pieces(done: list[int], window: int, expected: list[int]) -> None:
    pp = PiecePicker([100] * 8, [0, 4], have=done, stream_window=window)
    pp.add_source("all", PEER, range(8))
    got = []
    for _ in range(len(expected)):
        got += pp.pick("all", 1, 0.0)
    assert got == expected


def test_a_peer_without_the_window_pieces_gets_rarest_first_and_many_bytes_fill_from_the_window() -> None:
    pp = _two_files(250)
    pp.add_source("tail", PEER, [3, 7])
    assert pp.pick("tail", 1, 0.0) == [3]  # holds nothing in the windows: rarest first
    assert pp.pick("all", 450, 0.0) == [0, 4, 1, 5]  # up to max_bytes, window order
    assert pp.pick("more", 10**9, 0.0) == [2, 6]  # what is left of the windows, even with room for more


def test_integrity_failures_and_unwanted_pieces_are_skipped() -> None:
    pp = PiecePicker([100] * 6, [0], wanted=[1, 2, 3, 4, 5], stream_window=300)
    pp.add_source("p", PEER, range(6))
    pp.add_source("q", PEER, range(6))
    assert pp.pick("p", 1, 0.0) == [1]  # piece 0 is not wanted: the cursor starts at 1
    pp.piece_failed("p", 1, integrity=True)
    assert pp.pick("p", 1, 0.0) == [2]  # p sent bad bytes for 1: never asked again
    assert pp.pick("q", 1, 0.0) == [1]


def test_a_window_below_one_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        StreamOrder([1, 2], [0], 0)


def _mirror_picks(pp: PiecePicker, now: float = 0.0) -> list[int]:
    out: list[int] = []
    while picked := pp.pick("m", 1, now):
        out += picked
        _finish(pp, "m", picked)
    return out


def test_the_mirror_fetches_this_nodes_share_from_the_front() -> None:
    sizes = [2 << 20] * 24
    fc_on, fc_off = FirstCopy("me", sizes), FirstCopy("me", sizes)
    on = PiecePicker(sizes, [0, 12], mirror_overlap_budget=0, first_copy=fc_on, stream_window=16 << 20)
    off = PiecePicker(sizes, [0, 12], mirror_overlap_budget=0, first_copy=fc_off)
    for pp, fc in ((on, fc_on), (off, fc_off)):
        fc.set_members(["a", "b", "c"], 0.0)
        pp.add_source("m", MIRROR)
    mine = [i for i in range(24) if fc_on.owner(i) == "me"]
    assert mine == [i for i in range(24) if fc_off.owner(i) == "me"] and 0 < len(mine) < 24
    got, before = _mirror_picks(on), _mirror_picks(off)
    assert sorted(got) == sorted(before) == mine  # the same share, only that
    rank = fc_off.run_order.index
    # the front of both files first, block by block (a quarter window: two pieces), the first-copy rank order inside
    assert got == sorted(mine, key=lambda i: ((i % 12) // 2, rank(i)))


# -- properties -----------------------------------------------------------------


@st.composite
def _fetches(draw: st.DrawFn) -> tuple[list[int], list[int], list[int], int]:
    n = draw(st.integers(1, 30))
    sizes = draw(st.lists(st.sampled_from([50, 100, 100, 2 << 20]), min_size=n, max_size=n))
    starts = sorted({0, *draw(st.lists(st.integers(0, n - 1), max_size=3))})
    have = draw(st.lists(st.integers(0, n - 1), max_size=n // 2, unique=True))
    window = draw(st.sampled_from([1, 100, 250, 3 << 20, 10**9]))
    return sizes, starts, have, window


def _expected_window(pp: PiecePicker, sizes: list[int], starts: list[int], wanted: set[int], window: int) -> list[int]:
    """Rule 6 computed from scratch: each file's first piece still needed and the pieces under ``window`` past it."""
    out: list[tuple[int, int]] = []
    bounds = [*starts[1:], len(sizes)]
    for s, e in zip(starts, bounds, strict=True):
        cur = next((i for i in range(s, e) if i in wanted and pp.state(i) != PieceState.DONE), None)
        if cur is None:
            continue
        dist = 0
        for i in range(cur, e):
            if dist >= window:
                break
            out.append((dist, i))
            dist += sizes[i]
    return [i for _, i in sorted(out)]


@settings(max_examples=60, deadline=None)
@given(_fetches(), st.data())
def test_every_peer_pick_starts_with_the_first_pickable_window_piece(fetch: tuple[list[int], list[int], list[int], int],
                                                                      data: st.DataObject) -> None:
    sizes, starts, have, window = fetch
    n = len(sizes)
    wanted = set(data.draw(st.lists(st.integers(0, n - 1), min_size=1, unique=True)))
    pp = PiecePicker(sizes, starts, have=have, wanted=wanted, stream_window=window)
    peers = {f"p{k}": set(data.draw(st.lists(st.integers(0, n - 1), unique=True))) for k in range(3)}
    for sid, held in peers.items():
        pp.add_source(sid, PEER, held)
    for step in range(40):
        sid = data.draw(st.sampled_from(sorted(peers)))
        budget = data.draw(st.sampled_from([1, 150, 10**9]))
        win = _expected_window(pp, sizes, starts, wanted, window)
        free = [i for i in win if i in wanted and i in peers[sid] and pp.state(i) == PieceState.NONE and i not in pp.failed_pieces(sid)]
        picked = pp.pick(sid, budget, float(step))
        if free:
            assert picked[0] == free[0], (win, free, picked)
            assert picked == [i for i in free if i in picked], "window picks keep the window order"
        for i in picked:
            if data.draw(st.booleans()):
                _finish(pp, sid, [i])
            else:
                pp.piece_failed(sid, i, integrity=data.draw(st.booleans()))
        pp.check_invariant()


@settings(max_examples=50, deadline=None)
@given(_fetches())
def test_one_peer_holding_everything_delivers_each_file_in_order(fetch: tuple[list[int], list[int], list[int], int]) -> None:
    """A window covering everything, one piece at a time: each file's pieces come in ascending order."""
    sizes, starts, have, _ = fetch
    pp = PiecePicker(sizes, starts, have=have, stream_window=10**12)
    pp.add_source("p", PEER, range(len(sizes)))
    got = []
    while picked := pp.pick("p", 1, 0.0):
        got += picked
        _finish(pp, "p", picked)
    assert pp.is_complete
    bounds = [*starts[1:], len(sizes)]
    for s, e in zip(starts, bounds, strict=True):
        mine = [i for i in got if s <= i < e]
        assert mine == sorted(mine) == [i for i in range(s, e) if i not in have]


@settings(max_examples=50, deadline=None)
@given(_fetches(), st.lists(st.sampled_from("abcdefg"), max_size=5, unique=True))
def test_ownership_is_the_same_with_and_without_the_window(fetch: tuple[list[int], list[int], list[int], int],
                                                            members: list[str]) -> None:
    """The mirror takes exactly this node's share either way (first-copy rules untouched), small pieces and file fronts first."""
    sizes, starts, have, window = fetch
    fc_on, fc_off = FirstCopy("me", sizes), FirstCopy("me", sizes)
    on = PiecePicker(sizes, starts, have=have, mirror_overlap_budget=0, first_copy=fc_on, stream_window=window)
    off = PiecePicker(sizes, starts, have=have, mirror_overlap_budget=0, first_copy=fc_off)
    for pp, fc in ((on, fc_on), (off, fc_off)):
        fc.set_members(members, 0.0)
        pp.add_source("m", MIRROR)
    got, before = _mirror_picks(on), _mirror_picks(off)
    assert sorted(got) == sorted(before) == sorted(i for i in range(len(sizes)) if fc_on.owner(i) == "me" and i not in have)
    assert on.stream is not None
    order = on.stream.mirror_order(fc_on.run_order)
    assert got == [i for i in order if i in set(got)]
