"""The fetch progress view, fed real event objects: layout at any size, plain lines, failures, quiet."""

from __future__ import annotations

import io
import re

import pytest

from autoglm.node._progress import FetchDone, FetchStarted, FileDone, ProgressSnapshot, SourceFailed
from autoglm.node.cli._progress_view import (
    MAX_FILE_ROWS,
    FetchView,
    _File,
    _SourceState,
    _State,
    amount,
    human,
    layout,
)

MiB = 1 << 20
MIRROR = "mirror:http://127.0.0.1:8000/models/"


def _state(nfiles: int, size: int = 40 * MiB, active: int = 2) -> _State:
    files = [_File(f"weights/model-{i:05d}-of-{nfiles:05d}.safetensors", size) for i in range(nfiles)]
    for f in files[:3]:
        f.committed, f.done = size, True
    for f in files[3 : 3 + active]:
        f.committed, f.in_flight = 8 * MiB, 3 * MiB
    return _State(files, nfiles * size, rate=12.5 * MiB, sources={MIRROR: _SourceState(received=100 * MiB)})


@pytest.mark.parametrize(("width", "height"), [(80, 24), (200, 50), (40, 10), (60, 8), (12, 4)])
def test_every_row_fits_the_terminal(width: int, height: int) -> None:
    for st in (_state(1), _state(4), _state(60)):
        rows = layout(st, width, height)
        assert rows and all(len(r) <= width - 1 for r in rows), rows
        assert len(rows) <= max(height - 4, 2)  # the header and the prompt stay on screen


def test_many_files_collapse_to_the_active_ones_and_one_summary_row() -> None:
    rows = layout(_state(60, active=2), 80, 24)
    assert len(rows) == 2 + 1 + 2  # two active files, "+ 58 more", total, sources
    assert "model-00003" in rows[0] and "model-00004" in rows[1]
    assert rows[2].startswith("+ 58 more files: 3 done, 55 waiting")
    assert rows[3].startswith("total")
    # A file row counts the bytes still streaming: 8 MiB committed + 3 MiB in flight.
    assert "11.0/40.0 MiB" in rows[0]


def test_few_files_are_all_shown_and_the_number_of_file_rows_is_bounded() -> None:
    rows = layout(_state(4, active=1), 200, 50)
    assert sum("safetensors" in r for r in rows) == 4
    rows = layout(_state(60, active=20), 200, 50)
    assert sum("safetensors" in r for r in rows) == MAX_FILE_ROWS
    assert any(r.startswith("+ 55 more files: 3 done, 15 in progress, 37 waiting") for r in rows)


def test_units_are_binary_and_the_total_row_has_rate_and_time_left() -> None:
    assert human(1536) == "1.5 KiB" and human(3 * MiB) == "3.0 MiB" and human(1 << 30) == "1.0 GiB"
    assert amount(512 * 1024, 90 * MiB) == "0.5/90.0 MiB"
    total = next(r for r in layout(_state(4), 80, 24) if r.startswith("total"))
    assert "12.5 MiB/s" in total and re.search(r"\d:\d\d:\d\d$", total)
    assert not re.search(r"\d MB|\d GB|\d kB", "\n".join(layout(_state(4), 200, 50)))


def _started(files: tuple[tuple[str, int], ...], present: dict[str, int] | None = None) -> FetchStarted:
    present = present or {}
    return FetchStarted("ab" * 32, "demo/m", "1", "/out", files, sum(n for _, n in files),
                        sum(present.values()), (MIRROR,), present)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _plain(quiet: bool = False) -> tuple[FetchView, io.StringIO, io.StringIO, Clock]:
    out, err, clock = io.StringIO(), io.StringIO(), Clock()
    return FetchView(quiet=quiet, live=False, out=out, err=err, interval=5.0, clock=clock), out, err, clock


FILES = (("config.json", 100), ("model.safetensors", 90 * MiB))


def test_plain_output_is_a_line_every_few_seconds_and_one_per_file() -> None:
    view, out, err, clock = _plain()
    view.handle(_started(FILES))
    for step in range(1, 21):  # 10 s of snapshots every 0.5 s
        clock.t = step * 0.5
        got = step * 2 * MiB
        view.handle(ProgressSnapshot(0, 90 * MiB + 100, got, 8 * MiB, {}, {}, {"model.safetensors": got},
                                     {MIRROR: got}))
        if step == 3:
            view.handle(FileDone("config.json", 100))
    view.handle(FileDone("model.safetensors", 90 * MiB))
    view.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "fetching demo/m 1 into /out (90.0 MiB in 2 files)"
    status = [ln for ln in lines if "% " in ln]
    assert len(status) == 2  # at 5 s and 10 s
    assert status[0].strip().startswith("22% 20.0/90.0 MiB, 8.0 MiB/s")  # bytes received, not pieces committed
    assert "  done config.json (100 B)" in lines and "  done model.safetensors (90.0 MiB)" in lines
    assert "\x1b" not in out.getvalue() and err.getvalue() == ""


def test_failed_tries_of_a_mirror_make_one_line_with_their_count() -> None:
    view, out, err, _ = _plain()
    view.handle(_started(FILES))
    msg = "cannot connect to 127.0.0.1:1: Connection refused"
    for _ in range(7):
        view.handle(SourceFailed(MIRROR, msg))
    view.handle(SourceFailed(MIRROR, msg, permanent=True))
    view.close()
    assert err.getvalue().splitlines() == [f"warning: mirror 127.0.0.1:8000/models: {msg} (gave up after 8 tries)"]
    assert len(out.getvalue().splitlines()) == 1  # the header


def test_retries_that_recovered_are_told_once_in_the_status_line_and_at_the_end() -> None:
    view, out, err, clock = _plain()
    view.handle(_started(FILES))
    view.handle(SourceFailed(MIRROR, "HTTP 502 Bad Gateway"))
    view.handle(SourceFailed(MIRROR, "HTTP 502 Bad Gateway"))
    clock.t = 6
    view.handle(ProgressSnapshot(0, 90 * MiB + 100, MiB, MiB, {}, {}, {"model.safetensors": MiB}, {MIRROR: MiB}))
    view.close()
    assert "mirror 127.0.0.1:8000/models retrying (2 errors, last: HTTP 502 Bad Gateway)" in out.getvalue()
    assert err.getvalue() == "warning: mirror 127.0.0.1:8000/models: 2 failed requests, retried (last: HTTP 502 Bad Gateway)\n"


def test_a_complete_rerun_shows_every_file_complete() -> None:
    view, out, _, _ = _plain()
    present = {p: n for p, n in FILES}
    view.handle(_started(FILES, present))
    view.handle(ProgressSnapshot(90 * MiB + 100, 90 * MiB + 100, 0, 0.0, {}, present, {}, {}))
    view.handle(FetchDone(90 * MiB + 100, {}, 0.01, 0, "/out"))
    view.close()
    view.summary({"bytes_total": 90 * MiB + 100, "bytes_by_source": {}, "out": "/out"}, 0.02)
    assert view.state is not None
    assert all(f.shown == f.size for f in view.state.files)
    rows = layout(view.state, 80, 24)
    assert "100%" in rows[0] and "100%" in rows[1] and not re.search(r" 0/90.0 MiB", "\n".join(rows))
    assert rows[-1] == "nothing to fetch"
    assert out.getvalue().splitlines() == [
        "fetching demo/m 1 into /out (90.0 MiB in 2 files, all here already)",
        "done: 90.0 MiB in /out (all here already, nothing fetched)",
    ]


def test_the_source_row_follows_the_bytes_and_the_failures() -> None:
    view, _, _, _ = _plain()
    view.handle(_started(FILES))
    assert view.state is not None
    peer = "peer:12D3KooWAbCdEfGhIjKlMnOp"
    view.handle(ProgressSnapshot(0, 1, 0, 0.0, {}, {}, {}, {MIRROR: 5 * MiB, peer: MiB}))
    assert layout(view.state, 200, 50)[-1] == "from mirror 127.0.0.1:8000/models 5.0 MiB, peer 12D3Ko…MnOp 1.0 MiB"
    view.handle(SourceFailed(MIRROR, "stalled"))
    view.handle(ProgressSnapshot(0, 1, 0, 0.0, {}, {}, {}, {MIRROR: 6 * MiB, peer: 3 * MiB}))
    assert layout(view.state, 200, 50)[-1] == (
        "from mirror 127.0.0.1:8000/models 6.0 MiB retrying (1 error), peer 12D3Ko…MnOp 3.0 MiB")


def test_quiet_prints_only_the_final_line() -> None:
    view, out, err, clock = _plain(quiet=True)
    view.handle(_started(FILES))
    view.handle(SourceFailed(MIRROR, "HTTP 502"))
    clock.t = 30
    view.handle(ProgressSnapshot(0, 90 * MiB + 100, MiB, MiB, {}, {}, {"model.safetensors": MiB}, {MIRROR: MiB}))
    view.handle(FileDone("model.safetensors", 90 * MiB))
    view.handle(FetchDone(90 * MiB + 100, {MIRROR: 90 * MiB + 100}, 3.0, 0, "/out"))
    view.close()
    view.summary({"bytes_total": 90 * MiB + 100, "bytes_by_source": {MIRROR: 90 * MiB + 100}, "out": "/out"}, 3.0)
    assert out.getvalue() == "done: 90.0 MiB in /out (90.0 MiB fetched in 3.0 s, 30.0 MiB/s)\n"
    assert err.getvalue() == ""


def test_the_result_counts_what_came_over_the_network() -> None:
    """A resumed run: the mirror is credited with whole pieces, but sent only their missing part."""
    view, out, _, _ = _plain()
    result = {"bytes_total": 90 * MiB, "out": "/out", "bytes_by_source": {MIRROR: 60 * MiB, "local:store": 10 * MiB},
              "received_by_source": {MIRROR: 40 * MiB}}
    view.summary(result, 4.0)
    assert out.getvalue().splitlines() == [
        "  local copies: 10.0 MiB",
        "  mirror 127.0.0.1:8000/models: 40.0 MiB",
        "done: 90.0 MiB in /out (40.0 MiB fetched in 4.0 s, 10.0 MiB/s)",
    ]
