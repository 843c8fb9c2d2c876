"""Helpers for the terminal tests: a published model, a slow real mirror, a tmux pane to read back."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CLI = [sys.executable, "-m", "autoglm.node.cli"]
TMUX = shutil.which("tmux")


def cli(tmp: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=tmp, capture_output=True, text=True, timeout=timeout, check=False)


def publish(tmp: Path, *, extra_files: int = 10) -> dict[str, Path]:
    """A 24 MiB sample model in 8 MiB pieces (a piece takes seconds on the slow mirror) plus small files."""
    run = lambda *a: subprocess.run([*CLI, "--data-dir", str(tmp / "pub"), *a], check=True,  # noqa: E731
                                    capture_output=True, timeout=120)
    run("keygen", "--out", str(tmp / "key"))
    model = tmp / "model"
    run("sample-model", str(model), "--size", "24MiB")
    for i in range(extra_files):
        (model / "extra").mkdir(exist_ok=True)
        (model / "extra" / f"shard-{i:02d}-of-{extra_files:02d}.bin").write_bytes(os.urandom(128 << 10))
    run("publish", str(model), "--key", str(tmp / "key"), "--name", "demo/ux", "--version", "1",
        "--out", str(tmp / "m.agm"), "--max-piece", "8MiB")
    # The same files in 1 MiB pieces: an interrupted fetch of it has whole pieces to keep.
    run("publish", str(model), "--key", str(tmp / "key"), "--name", "demo/ux", "--version", "1",
        "--out", str(tmp / "small-pieces.agm"), "--max-piece", "1MiB")
    return {"model": model, "manifest": tmp / "m.agm", "small_pieces": tmp / "small-pieces.agm",
            "key": tmp / "key.pub", "tmp": tmp}


class Process:
    """A long-running CLI process (mirror, node); stdout lines are read as they come."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self._log = open(log, "wb")
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True)

    def readline_until(self, pred: Callable[[str], bool], timeout: float) -> str:
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"process exited ({self.p.poll()}) before the expected line")
            if pred(line.strip()):
                return line.strip()
        raise TimeoutError("no expected line in time")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=10)
        self._log.close()


def start_mirror(model: Path, log_dir: Path, rate: float) -> tuple[list[Process], str]:
    """A real ``serve-mirror`` behind a relay that passes ``rate`` bytes/s: a slow mirror."""
    mirror = Process([*CLI, "serve-mirror", str(model)], log_dir / "mirror.err")
    url = mirror.readline_until(lambda ln: ln.startswith("http://"), 30)
    port = url.rstrip("/").rsplit(":", 1)[1]
    relay = Process([sys.executable, str(Path(__file__).with_name("throttle.py")), port, str(rate)],
                    log_dir / "throttle.err")
    return [relay, mirror], relay.readline_until(lambda ln: ln.startswith("http://"), 30)


def start_join_node(data_dir: Path, key: Path, out: Path) -> Process:
    node = Process([*CLI, "--data-dir", str(data_dir), "join", "--json", "--trust", str(key), "--out", str(out)],
                   data_dir.parent / f"{data_dir.name}.err")
    node.readline_until(lambda ln: ln.startswith("{") and json.loads(ln).get("event") == "ready", 60)
    return node


class Pane:
    """One tmux server and session of a fixed size (its own socket), running one command."""

    def __init__(self, name: str, width: int, height: int) -> None:
        assert TMUX is not None
        self.socket = f"progress-ux-{os.getpid()}-{name}"
        self.width, self.height = width, height

    def _tmux(self, *args: str) -> str:
        return subprocess.run([TMUX, "-L", self.socket, "-f", "/dev/null", *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout

    def run(self, argv: list[str], cwd: Path) -> None:
        # The exit status lands on the screen; the pane stays open for capture.
        env = "env LANG=C.UTF-8 LC_ALL=C.UTF-8 TERM=xterm-256color"
        cmd = f"cd {shlex.quote(str(cwd))} && {env} {shlex.join(argv)}; echo EXIT=$?; sleep 600"
        self._tmux("new-session", "-d", "-s", "ux", "-x", str(self.width), "-y", str(self.height), cmd)

    def capture(self, joined: bool = False) -> list[str]:
        """The visible screen, one string per row (``joined``: rows the terminal wrapped are one)."""
        args = ["capture-pane", "-p", "-t", "ux"] + (["-J"] if joined else [])
        return self._tmux(*args).rstrip("\n").split("\n")

    def wait(self, pred: Callable[[list[str]], bool], timeout: float) -> list[str]:
        """Read the screen until ``pred`` holds (a bounded poll of a display, not a sleep for sync)."""
        deadline = time.monotonic() + timeout
        screen: list[str] = []
        while time.monotonic() < deadline:
            screen = self.capture()
            if pred(screen):
                return screen
            if any(_EXIT.fullmatch(ln.strip()) for ln in screen):
                break  # the command ended and the screen will not change
            time.sleep(0.1)
        raise TimeoutError("the screen never matched; last screen:\n" + "\n".join(screen))

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "ux", *keys)

    def exit_code(self, timeout: float) -> int:
        screen = self.wait(lambda s: any(_EXIT.fullmatch(ln.strip()) for ln in s), timeout)
        return int(next(ln.strip()[5:] for ln in screen if _EXIT.fullmatch(ln.strip())))

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True, timeout=10, check=False)


_EXIT = re.compile(r"EXIT=\d+")
TOTAL_ROW = re.compile(r"^total\s+\S*\s+(\d+)%\s+([\d.]+)/([\d.]+) (B|KiB|MiB|GiB)")


def total_percent(screen: list[str]) -> int | None:
    for ln in screen:
        m = TOTAL_ROW.match(ln)
        if m:
            return int(m.group(1))
    return None
