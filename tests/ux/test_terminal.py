"""`fetch` as a person sees it: a real tmux pane at 80×24 and 200×50, read back with capture-pane.

A real `serve-mirror` process behind a rate-limiting relay makes the fetch
slow enough to watch; a real `join` node takes a handed-over fetch; a refused port is a
mirror that is not there. Piped output (not a terminal) is checked too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from .terminal import (
    CLI,
    TMUX,
    Pane,
    Process,
    cli,
    publish,
    start_join_node,
    start_mirror,
    total_percent,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(TMUX is None, reason="tmux is not installed (scripts/setup installs it)"),
]

RATE = 4 << 20  # bytes/s for the whole mirror: the model takes about 6 s


@pytest.fixture(scope="module")
def pub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return publish(tmp_path_factory.mktemp("ux"))


@pytest.fixture(scope="module")
def total(pub: dict[str, Path]) -> tuple[float, str]:
    """The model's size in MiB, and as the display writes it."""
    mib = sum(f.stat().st_size for f in pub["model"].rglob("*") if f.is_file()) / (1 << 20)
    return mib, f"{mib:.1f} MiB"


@pytest.fixture(scope="module")
def mirror(pub: dict[str, Path]) -> Iterator[str]:
    procs, url = start_mirror(pub["model"], pub["tmp"], RATE)
    try:
        yield url
    finally:
        for p in procs:
            p.stop()


@pytest.fixture
def pane_factory() -> Iterator[list[Pane]]:
    panes: list[Pane] = []
    yield panes
    for p in panes:
        p.close()


def _pane(panes: list[Pane], name: str, width: int, height: int) -> Pane:
    p = Pane(name, width, height)
    panes.append(p)
    return p


def _fetch_argv(pub: dict[str, Path], data: Path, out: Path, *mirrors: str, manifest: str = "manifest") -> list[str]:
    argv = [*CLI, "--data-dir", str(data), "fetch", str(pub[manifest]), "--trust", str(pub["key"]), "--out", str(out)]
    for m in mirrors:
        argv += ["--mirror", m]
    return argv


MESSAGES = ("done: ", "error: ", "warning: ")  # lines printed once, with full paths: the terminal may wrap them


def _no_wrapped_rows(pane: Pane) -> None:
    """No header or progress row is wider than the pane (capture -J joins rows the terminal wrapped)."""
    rows, joined = pane.capture(), pane.capture(joined=True)
    wrapped = [ln for ln in joined if ln not in rows]
    assert all(ln.startswith(MESSAGES) for ln in wrapped), "a row wrapped:\n" + "\n".join(rows)


def _watch(pane: Pane, width: int, screens: list[list[str]] | None = None) -> list[int]:
    """Percentages of the total row seen while the fetch runs; checks each screen on the way."""
    seen: list[int] = []
    screens = [] if screens is None else screens

    def step(screen: list[str]) -> bool:
        pct = total_percent(screen)
        if pct is not None and 0 < pct < 100 and pct not in seen:
            seen.append(pct)
            screens.append(screen)
            assert screen[0].startswith("fetching demo/ux 1 ("), screen  # the header stays on screen
            assert all(len(ln) < width for ln in screen)
            assert not re.search(r"\d (MB|GB|kB)\b", "\n".join(screen))  # binary units only
        return any(ln.startswith("done: ") for ln in screen)

    pane.wait(step, 120)
    return seen


@pytest.mark.parametrize(("width", "height"), [(80, 24), (200, 50)])
def test_a_fetch_from_a_slow_mirror(pub: dict[str, Path], total: tuple[float, str], mirror: str, pane_factory: list[Pane],
                                    tmp_path: Path, width: int, height: int) -> None:
    TOTAL_MIB, TOTAL = total
    pane = _pane(pane_factory, f"fetch{width}", width, height)
    pane.run(_fetch_argv(pub, tmp_path / "d", tmp_path / "out", mirror), tmp_path)
    screens: list[list[str]] = []
    seen = _watch(pane, width, screens)
    # The bar moved while 8 MiB pieces streamed in, not only when pieces were committed.
    assert len(seen) >= 8, seen
    assert pane.exit_code(30) == 0
    screen = pane.capture()
    _no_wrapped_rows(pane)
    assert screen[0].startswith(f"fetching demo/ux 1 ({TOTAL} in 13 files) into ")
    rows = [ln for ln in screen if "%" in ln]
    assert len(rows) <= 1 + 5 + 1  # total, at most five files, "+ N more files" (no percentage)
    # 13 files collapse to the ones in progress and one row for the rest.
    assert any(ln.startswith("+ ") and " more files: " in ln for s in screens for ln in s)
    assert "13 files: 13 done" in screen
    assert total_percent(screen) == 100 and f"{TOTAL_MIB:.1f}/{TOTAL}" in next(ln for ln in screen if ln.startswith("total"))
    assert any(re.match(rf"done: {re.escape(TOTAL)} in .* \({re.escape(TOTAL)} fetched in [\d.]+ s, [\d.]+ MiB/s\)$", ln) for ln in pane.capture(joined=True))
    assert any(ln.startswith("from mirror 127.0.0.1:") and TOTAL in ln for ln in screen)  # not a stale label

    # Run again: everything is here; every file row says so.
    again = _pane(pane_factory, f"again{width}", width, height)
    again.run(_fetch_argv(pub, tmp_path / "d", tmp_path / "out", mirror), tmp_path)
    assert again.exit_code(60) == 0
    screen = again.capture()
    _no_wrapped_rows(again)
    assert "all here already" in screen[0]
    pct_rows = [ln for ln in screen if re.search(r"\d+%", ln)]
    assert pct_rows and all(" 100% " in ln for ln in pct_rows), pct_rows
    assert any(ln.startswith("done: ") and "nothing fetched" in ln for ln in again.capture(joined=True))


def test_interrupt_and_resume(pub: dict[str, Path], total: tuple[float, str], mirror: str, pane_factory: list[Pane], tmp_path: Path) -> None:
    TOTAL_MIB, TOTAL = total
    first = _pane(pane_factory, "interrupt", 80, 24)
    first.run(_fetch_argv(pub, tmp_path / "d", tmp_path / "out", mirror, manifest="small_pieces"), tmp_path)
    # Received is not kept: a mirror's connections buffer up to 2 MiB each before the
    # bytes are written and verified; late in the fetch whole pieces are on disk.
    first.wait(lambda s: (total_percent(s) or 0) >= 70, 60)
    first.keys("C-c")
    assert first.exit_code(30) == 130
    screen = first.capture()
    assert any("interrupted; run the same command again to resume" in ln for ln in screen)
    _no_wrapped_rows(first)

    second = _pane(pane_factory, "resume", 80, 24)
    second.run(_fetch_argv(pub, tmp_path / "d", tmp_path / "out", mirror, manifest="small_pieces"), tmp_path)
    start = second.wait(lambda s: total_percent(s) is not None, 30)
    here = re.search(r"files, ([\d.]+) MiB here already\)", start[0])
    assert here and float(here.group(1)) >= TOTAL_MIB * 0.2, start  # the header and the bar start from what is on disk
    assert total_percent(start) >= 20  # type: ignore[operator]
    assert second.exit_code(120) == 0
    done = next(ln for ln in second.capture(joined=True) if ln.startswith("done: "))
    fetched = float(re.search(r"\(([\d.]+) MiB fetched", done).group(1))  # type: ignore[union-attr]
    assert fetched <= TOTAL_MIB - float(here.group(1)) + 0.1, done  # it went on where the first run stopped
    _no_wrapped_rows(second)


def test_a_fetch_handed_to_the_running_node(pub: dict[str, Path], total: tuple[float, str], mirror: str, pane_factory: list[Pane],
                                            tmp_path: Path) -> None:
    TOTAL_MIB, TOTAL = total
    node: Process = start_join_node(tmp_path / "node", pub["key"], tmp_path / "node-out")
    try:
        pane = _pane(pane_factory, "handed", 80, 24)
        pane.run(_fetch_argv(pub, tmp_path / "node", tmp_path / "via-node", mirror), tmp_path)
        seen = _watch(pane, 80)
        assert len(seen) >= 5, seen  # the node's relayed events drive the same live rows
        assert pane.exit_code(30) == 0
        screen = pane.capture()
        _no_wrapped_rows(pane)
        assert total_percent(screen) == 100
        assert any(ln.startswith(f"done: {TOTAL} in ") for ln in screen)
    finally:
        node.stop()


def test_a_refused_mirror_fails_fast_with_one_line(pub: dict[str, Path], pane_factory: list[Pane],
                                                   tmp_path: Path) -> None:
    pane = _pane(pane_factory, "refused", 80, 24)
    pane.run(_fetch_argv(pub, tmp_path / "d", tmp_path / "out", "http://127.0.0.1:1/"), tmp_path)
    assert pane.exit_code(30) == 6
    lines = [ln for ln in pane.capture(joined=True) if ln.strip()]
    assert lines[0].startswith("fetching demo/ux 1 (")
    assert len([ln for ln in lines if "gave up after" in ln]) == 1, lines
    assert lines[-2].startswith("error: no source can provide") and lines[-1] == "EXIT=6"
    assert len(lines) <= 3 + 1 + 1  # header, the mirror's line, the error, EXIT (and at most the bar's last state)


def test_piped_output_is_plain_lines(pub: dict[str, Path], total: tuple[float, str], mirror: str, tmp_path: Path) -> None:
    TOTAL_MIB, TOTAL = total
    res = cli(tmp_path, *_fetch_argv(pub, tmp_path / "d", tmp_path / "out", mirror)[len(CLI):])
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert "\x1b" not in res.stdout and "\r" not in res.stdout and res.stderr == ""
    assert out[0] == f"fetching demo/ux 1 into {tmp_path / 'out'} ({TOTAL} in 13 files)"
    assert sum(ln.startswith("  done ") for ln in out) == 13  # a line per finished file
    status = [ln for ln in out if re.match(rf"^\s+\d+% [\d.]+/{re.escape(TOTAL)}, [\d.]+ (KiB|MiB)/s, ", ln)]
    assert 1 <= len(status) <= 4  # one every few seconds of a ~6 s fetch
    assert out[-1].startswith(f"done: {TOTAL} in ")

    res = cli(tmp_path, *_fetch_argv(pub, tmp_path / "d2", tmp_path / "out2", "http://127.0.0.1:1/")[len(CLI):])
    assert res.returncode == 6
    assert len(res.stdout.splitlines()) == 1 and len(res.stderr.splitlines()) == 2, (res.stdout, res.stderr)
    assert "gave up after" in res.stderr and "\x1b" not in res.stdout + res.stderr


def _has_global_quiet(tmp: Path) -> bool:
    return "--quiet" in cli(tmp, "fetch", "--help").stdout


def test_quiet_prints_only_the_final_line(pub: dict[str, Path], total: tuple[float, str], mirror: str,
                                          pane_factory: list[Pane], tmp_path: Path) -> None:
    TOTAL_MIB, TOTAL = total
    if not _has_global_quiet(tmp_path):
        pytest.skip("this build has no global -q/--quiet yet (it comes with the CLI-conventions change)")
    pane = _pane(pane_factory, "quiet", 80, 24)
    pane.run([*_fetch_argv(pub, tmp_path / "d", tmp_path / "out", mirror), "-q"], tmp_path)
    assert pane.exit_code(120) == 0
    lines = [ln for ln in pane.capture(joined=True) if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith(f"done: {TOTAL} in ") and lines[1] == "EXIT=0", lines
