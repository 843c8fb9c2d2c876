"""How ``fetch`` shows its progress: live rows on a terminal, plain lines elsewhere, JSON, or quiet.

One event stream (:mod:`autoglm.node._progress`, from the engine here or relayed
by a running node) feeds one :class:`FetchView`, which picks its output once:

* **live** (stdout is a terminal): a few rows redrawn in place, none wider than
  the terminal: one row per file being fetched (at most ``MAX_FILE_ROWS``, and
  fewer on a short terminal; the other files are summed in one row), the total,
  and a line naming each source with what it sent and whether it is failing.
* **plain** (stdout is a pipe or a file, or ``TERM=dumb``): a status line every
  ``PLAIN_INTERVAL`` seconds and a line per finished file; never a cursor move.
* **json**: the events themselves, one object per line (the CLI prints the summary).
* **quiet** (``-q``): nothing but the final line; errors reach stderr from the CLI.

Numbers count bytes as they arrive (verified and committed, plus pieces still
streaming), so a large piece moves the bar; sizes are binary (KiB, MiB, GiB).
A source's failures collapse: retries show as a count on the sources row (or
in the next plain status line), a source given up on gets one line with its
number of tries, and retries that ended well get one line at the end.

Only the standard library is imported here at module level: a fetch handed to
a running node with ``--json`` must not load rich (tests/swarm checks it).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live

    from autoglm.node._progress import (
        Event,
        FetchDone,
        FetchStarted,
        ProgressSnapshot,
        SourceFailed,
    )

__all__ = ["MAX_FILE_ROWS", "PLAIN_INTERVAL", "FetchView", "amount", "human", "layout"]

PLAIN_INTERVAL = 5.0  # seconds between two status lines when not on a terminal
MAX_FILE_ROWS = 5
REDRAW_MIN = 0.1  # seconds: file-done events of many small files do not redraw more often

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _scale(n: float) -> tuple[float, str]:
    i = 0
    while abs(n) >= 1024 and i < len(_UNITS) - 1:
        n /= 1024
        i += 1
    return n, _UNITS[i]


def human(n: float) -> str:
    """``1.5 MiB``; bytes as a whole number."""
    v, unit = _scale(n)
    return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"


def amount(done: float, total: float) -> str:
    """``12.3/86.6 MiB``: both in the total's unit."""
    t, unit = _scale(total)
    d = done / (1024 ** _UNITS.index(unit))
    return f"{d:.0f}/{t:.0f} B" if unit == "B" else f"{d:.1f}/{t:.1f} {unit}"


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds > 99 * 3600:
        return "-:--:--"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _source_label(sid: str) -> str:
    kind, _, rest = sid.partition(":")
    if kind == "mirror":
        rest = rest.split("://", 1)[-1].rstrip("/")
        return f"mirror {rest}"
    if kind == "peer":
        return f"peer {rest[:6]}…{rest[-4:]}" if len(rest) > 12 else f"peer {rest}"
    if kind == "local":
        return "local copies"
    return sid


def _fit(text: str, width: int) -> str:
    """Cut at the end with an ellipsis."""
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def _fit_path_start(path: str, width: int) -> str:
    if len(path) <= width:
        return path
    return "…" + path[len(path) - max(width, 2) + 1 :]


def _fit_path(path: str, width: int) -> str:
    """Folders go first, then the middle of the name (``model-00003…tensors`` keeps the shard number)."""
    if width <= 0:
        return ""
    if len(path) <= width:
        return path
    name = path.rsplit("/", 1)[-1]
    if len(name) + 2 <= width:
        return "…/" + name
    if width < 5:
        return name[:width]
    head = (width - 1) * 3 // 5
    return name[:head] + "…" + name[len(name) - (width - 1 - head) :]


@dataclass(slots=True)
class _File:
    path: str
    size: int
    committed: int = 0
    in_flight: int = 0
    done: bool = False
    done_at_start: bool = False

    @property
    def shown(self) -> int:
        return self.size if self.done else min(self.size, self.committed + self.in_flight)

    @property
    def active(self) -> bool:
        return not self.done and self.shown > 0


@dataclass(slots=True)
class _SourceState:
    received: int = 0
    failures: int = 0
    message: str = ""
    gave_up: bool = False
    reported: int = 0  # failures already told in a line of their own

    def status(self) -> str:
        if self.gave_up:
            return "gave up"
        if self.failures > self.reported:
            return f"retrying ({self.failures} error{'s' if self.failures > 1 else ''})"
        return ""


@dataclass(slots=True)
class _State:
    """What the view knows; :func:`layout` draws it (pure, for tests at any size)."""

    files: list[_File]
    total: int
    rate: float = 0.0
    done_reported: int = 0
    sources: dict[str, _SourceState] | None = None

    @property
    def shown(self) -> int:
        return min(self.total, max(sum(f.shown for f in self.files), self.done_reported))

    def eta(self) -> float | None:
        left = self.total - self.shown
        if left <= 0:
            return 0.0
        return left / self.rate if self.rate > 0 else None


def _bar(frac: float, width: int, ascii_only: bool) -> str:
    full, empty = ("#", "-") if ascii_only else ("━", "─")
    n = max(0, min(width, int(frac * width)))
    return full * n + empty * (width - n)


def _sources_line(st: _State) -> str:
    parts = []
    for sid, s in (st.sources or {}).items():
        if not s.received and not s.failures:
            continue
        status = s.status()
        got = f" {human(s.received)}" if s.received else ""
        parts.append(f"{_source_label(sid)}{got}" + (f" {status}" if status else ""))
    if parts:
        return "from " + ", ".join(parts)
    return "nothing to fetch" if st.shown >= st.total else "waiting for sources"


def layout(st: _State, width: int, height: int, *, ascii_only: bool = False) -> list[str]:
    """The live rows for a terminal of ``width`` × ``height``: each at most width-1 long.

    Files being fetched get a row each (all files when they fit), the rest one
    summary row; then the total with rate and time left; then the sources.
    """
    w = max(width - 1, 10)  # the last column would wrap on some terminals
    amount_w = 17
    fixed = 1 + 4 + 1 + amount_w  # " pct amount"
    extra = 1 + 11 + 1 + 7  # " rate eta"
    with_rate = w >= 70
    room = w - fixed - (extra if with_rate else 0)
    name_w = max(8, min(40, w * 2 // 7))
    bar_w = min(60, room - name_w - 1)
    if bar_w < 5:
        bar_w = 0
        name_w = max(1, room)
    else:
        name_w = min(60, room - bar_w - 1)

    def row(name: str, done: int, total: int, tail: str = "") -> str:
        frac = done / total if total else 1.0
        parts = [_fit_path(name, name_w).ljust(name_w)]
        if bar_w:
            parts.append(_bar(frac, bar_w, ascii_only))
        parts.append(f"{100 * frac:3.0f}%")
        parts.append(amount(done, total).rjust(amount_w))
        line = " ".join(parts)
        if tail:
            line += " " + tail
        return _fit(line, w)

    rows: list[str] = []
    budget = max(2, height - 4) - 2  # rows for files: the header, the total, the sources and the prompt stay
    if len(st.files) > 1 and budget > 0:
        if len(st.files) <= min(budget, MAX_FILE_ROWS):
            shown = st.files
        else:
            shown = [f for f in st.files if f.active][: min(budget - 1, MAX_FILE_ROWS)]
        for f in shown:
            rows.append(row(f.path, f.shown, f.size))
        hidden = [f for f in st.files if f not in shown]
        if hidden:
            ndone = sum(f.done for f in hidden)
            busy = sum(f.active for f in hidden)
            waiting = len(hidden) - ndone - busy
            what = ", ".join(p for p in (f"{ndone} done" if ndone else "", f"{busy} in progress" if busy else "",
                                         f"{waiting} waiting" if waiting else "") if p)
            more = f"+ {len(hidden)} more" if shown else f"{len(hidden)}"
            rows.append(_fit(f"{more} file{'s' if len(hidden) > 1 else ''}: {what}", w))
    rate = f"{human(st.rate)}/s"
    eta = _duration(st.eta())
    rows.append(row("total", st.shown, st.total, f"{rate:>11} {eta:>7}" if with_rate else ""))
    src = _sources_line(st)
    rows.append(_fit(src if with_rate else f"{rate}, {eta} left; {src}", w))
    return rows


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"


class FetchView:
    """Consumes fetch events and shows them (see the module docstring for the modes).

    ``live``: None picks from stdout (a terminal or not). ``out``/``err``: where
    plain lines go (default stdout/stderr). ``clock``: monotonic seconds.
    """

    def __init__(
        self,
        json_mode: bool = False,
        *,
        quiet: bool = False,
        live: bool | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
        interval: float = PLAIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.json = json_mode
        self.quiet = quiet and not json_mode
        self.live_mode = (not json_mode and not quiet and _stdout_is_terminal()) if live is None else live
        self._out = out
        self._err = err
        self.interval = interval
        self.clock = clock
        self.done: FetchDone | None = None
        self.state: _State | None = None
        self._files: dict[str, _File] = {}
        self._live: Live | None = None
        self._console: Console | None = None
        self._last_line = 0.0
        self._last_draw = 0.0
        self._ascii = False
        self._shown_at_start = 0

    # -- output ----------------------------------------------------------------
    def _print(self, text: str) -> None:
        if self.quiet:
            return
        if self._live is not None:
            from rich.text import Text

            self._live.console.print(Text(text), soft_wrap=True)
            return
        out = self._out or sys.stdout
        out.write(text + "\n")
        out.flush()

    def _warn(self, text: str) -> None:
        if self.quiet:
            return
        if self._live is not None:
            from rich.text import Text

            self._live.console.print(Text("warning: ", style="yellow") + Text(text), soft_wrap=True)
            return
        err = self._err or sys.stderr
        err.write(f"warning: {text}\n")
        err.flush()

    def _draw(self, force: bool = False) -> None:
        if self._live is None or self.state is None or self._console is None:
            return
        now = self.clock()
        if not force and now - self._last_draw < REDRAW_MIN:
            return
        self._last_draw = now
        from rich.console import Group
        from rich.text import Text

        width, height = self._console.size
        texts = []
        for line in layout(self.state, width, height, ascii_only=self._ascii):
            t = Text(line, no_wrap=True, overflow="ellipsis")
            t.highlight_regex("[━#]+(?=[─-]*[ ]+ *\\d+%)", "green")
            t.highlight_regex("^total", "bold")
            t.highlight_regex("retrying \\(\\d+ errors?\\)|gave up", "yellow")
            texts.append(t)
        self._live.update(Group(*texts), refresh=True)

    # -- events ----------------------------------------------------------------
    def handle_line(self, line: dict[str, Any]) -> None:
        """One event line relayed by a running node: printed as it is in --json mode."""
        if self.json:
            if line.get("event") != "done":  # the summary comes last, from the CLI
                from ._common import print_json

                print_json(line)
            return
        from autoglm.node._progress import from_json

        ev = from_json(line)
        if ev is not None:
            self.handle(ev)

    def handle(self, ev: Event) -> None:
        from autoglm.node._progress import (
            FetchDone,
            FetchStarted,
            FileDone,
            ProgressSnapshot,
            SourceFailed,
        )

        if isinstance(ev, FetchDone):
            self.done = ev
        if self.json:
            if not isinstance(ev, FetchDone):
                from autoglm.node._progress import to_json

                from ._common import print_json

                print_json(to_json(ev))
            return
        if isinstance(ev, FetchStarted):
            self._started(ev)
        elif self.state is None:
            return  # events before the start (empty files, local copies) are in its numbers
        elif isinstance(ev, ProgressSnapshot):
            self._snapshot(ev)
        elif isinstance(ev, FileDone):
            f = self._files.get(ev.path)
            if f is not None and not f.done:
                f.done = True
                if not self.live_mode:
                    self._print(f"  done {ev.path} ({human(ev.size)})")
                self._draw()
        elif isinstance(ev, SourceFailed):
            self._source_failed(ev)
        elif isinstance(ev, FetchDone):
            for f in self.state.files:
                f.done = True
            fetched = sum(n for sid, n in ev.bytes_by_source.items() if not sid.startswith("local:"))
            self.state.rate = fetched / ev.seconds if ev.seconds > 0 else 0.0  # the average, at the end
            self._draw(force=True)

    def _started(self, ev: FetchStarted) -> None:
        files = []
        for path, size in ev.files:
            have = min(size, ev.present_by_file.get(path, 0))
            f = _File(path, size, committed=have)
            if size == 0 or (ev.bytes_present >= ev.bytes_total and not ev.present_by_file):
                f.committed = size  # a relayed start from a node without per-file numbers
            f.done = f.done_at_start = f.committed >= size
            files.append(f)
        self._files = {f.path: f for f in files}
        sources = {sid: _SourceState() for sid in ev.sources}
        self.state = _State(files, ev.bytes_total, done_reported=ev.bytes_present, sources=sources)
        present = self._shown_at_start = self.state.shown
        what = f"{human(ev.bytes_total)} in {len(files)} file{'s' if len(files) != 1 else ''}"
        if ev.bytes_total and present >= ev.bytes_total:
            what += ", all here already"
        elif present:
            what += f", {human(present)} here already"
        if self.live_mode and not self.quiet:
            from rich.live import Live

            from ._common import console

            # One row on a terminal: the folder is cut at its start when it does not fit.
            head = f"fetching {ev.name} {ev.version} ({what}) into "
            room = console.size.width - 1 - len(head)
            if room >= min(len(ev.out_dir), 16):
                self._print(head + _fit_path_start(ev.out_dir, room))
            else:
                self._print(_fit(head.rstrip(), console.size.width - 1))
                self._print(_fit_path_start(ev.out_dir, console.size.width - 1))
            self._console = console
            enc = (getattr(sys.stdout, "encoding", "") or "").lower()
            self._ascii = "utf" not in enc
            self._live = Live(console=console, auto_refresh=False, transient=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
            self._draw(force=True)
        else:
            self._print(f"fetching {ev.name} {ev.version} into {ev.out_dir} ({what})")
        self._last_line = self.clock()

    def _snapshot(self, ev: ProgressSnapshot) -> None:
        st = self.state
        assert st is not None and st.sources is not None
        st.rate = ev.rate
        st.done_reported = ev.bytes_done
        for f in st.files:
            if f.path in ev.by_file:
                f.committed = max(f.committed, ev.by_file[f.path])
            f.in_flight = ev.in_flight_by_file.get(f.path, 0)
        for sid, n in (ev.received_by_source or ev.by_source).items():
            st.sources.setdefault(sid, _SourceState()).received = n
        if self.live_mode:
            self._draw(force=True)
            return
        now = self.clock()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._print("  " + self._status_line())

    def _status_line(self) -> str:
        st = self.state
        assert st is not None and st.sources is not None
        frac = st.shown / st.total if st.total else 1.0
        ndone = sum(f.done for f in st.files)
        line = (f"{100 * frac:3.0f}% {amount(st.shown, st.total)}, {human(st.rate)}/s, "
                f"{_duration(st.eta())} left, {ndone}/{len(st.files)} files")
        for sid, s in st.sources.items():
            if s.failures > s.reported and not s.gave_up:
                line += f"; {_source_label(sid)} retrying ({s.failures} errors, last: {s.message})"
        return line

    def _source_failed(self, ev: SourceFailed) -> None:
        st = self.state
        assert st is not None and st.sources is not None
        s = st.sources.setdefault(ev.source_id, _SourceState())
        s.failures += 1
        line = None
        if ev.permanent:
            # A permanent failure may repeat (several requests in flight to a mirror
            # that lacks a file): one line per distinct message.
            if not s.gave_up or ev.message != s.message:
                tries = f"after {s.failures} tr{'ies' if s.failures > 1 else 'y'}"
                what = "bad data" if ev.integrity else "gave up"
                line = f"{_source_label(ev.source_id)}: {ev.message} ({what} {tries})"
            s.gave_up = True
            s.reported = s.failures
        elif ev.integrity and ev.message != s.message:
            line = f"{_source_label(ev.source_id)}: bad data: {ev.message}"
        s.message = ev.message
        # The rows first: printing a line above them redraws the rows it has.
        self._draw(force=line is not None)
        if line is not None:
            self._warn(line)

    # -- end ---------------------------------------------------------------------
    def close(self) -> None:
        """Stop the live rows (leaving their last state) and tell retries nobody saw end."""
        if self._live is not None:
            self._draw(force=True)
            # A fetch that failed before any byte arrived: rows at 0 % only hide the error.
            st = self.state
            if self.done is None and st is not None and st.shown <= self._shown_at_start:
                self._live.transient = True
            self._live.stop()
            self._live = None
        if self.state is not None and self.state.sources:
            for sid, s in self.state.sources.items():
                if s.failures > s.reported and not s.gave_up:
                    n = s.failures - s.reported
                    self._warn(f"{_source_label(sid)}: {n} failed request{'s' if n > 1 else ''}, retried (last: {s.message})")
                    s.reported = s.failures

    def summary(self, result: dict[str, Any], seconds: float) -> None:
        """Bytes per source, then the final line (the only one in quiet mode)."""
        by_source: dict[str, int] = result.get("bytes_by_source") or {}
        # What came over the network: the bytes each source sent (a resumed piece
        # counts only its missing part), else the pieces each one is credited with.
        received: dict[str, int] = result.get("received_by_source") or {}
        fetched = sum(received.values()) or sum(n for sid, n in by_source.items() if not sid.startswith("local:"))
        total = int(result.get("bytes_total") or 0)
        if not by_source:
            how = "all here already, nothing fetched"
        else:
            rate = fetched / seconds if seconds > 0 else 0.0
            how = f"{human(fetched)} fetched in {seconds:.1f} s, {human(rate)}/s"
        out = self._out or sys.stdout
        if not self.quiet:
            # Each source's share of "fetched", and what local copies gave.
            shares = dict(received) if received else {k: v for k, v in by_source.items() if not k.startswith("local:")}
            shares.update({k: v for k, v in by_source.items() if k.startswith("local:")})
            for sid, n in sorted(shares.items()):
                if n:
                    out.write(f"  {_source_label(sid)}: {human(n)}\n")
        out.write(f"done: {human(total)} in {result.get('out')} ({how})\n")
        out.flush()
