"""Real processes on 127.0.0.1 for the swarm integration tests.

Readiness and progress come from JSON lines on each process's stdout; every
wait has a deadline. Processes are ended by PID, SIGTERM first.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "autoglm.node.cli"]


class Proc:
    """A child process whose stdout lines are read by a thread into a queue."""

    def __init__(self, argv: list[str], name: str, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.err_path = log_dir / f"{name}.err"
        self._err = open(self.err_path, "wb")
        self.p = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._err, env={**os.environ, **(env or {})}, start_new_session=True
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            try:
                self.lines.put(json.loads(raw))
            except ValueError:
                self.lines.put({"event": "text", "text": raw.decode(errors="replace").rstrip()})
        self.lines.put(None)

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        for line in self.seen:
            if pred(line):
                return line
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no matching line in {timeout}s; stderr tail:\n{self.stderr_tail()}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.p.poll()}); stderr tail:\n{self.stderr_tail()}")
            self.seen.append(line)
            if pred(line):
                return line

    def event(self, name: str, timeout: float) -> dict[str, Any]:
        return self.wait_for(lambda ln: ln.get("event") == name, timeout)

    def stderr_tail(self, n: int = 4000) -> str:
        try:
            return self.err_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=10)

    def stop(self, timeout: float = 10) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=10)
        self._err.close()
        return self.p.returncode


@contextmanager
def processes() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


def publish(tmp: Path, size: str = "24MiB", piece: str = "1MiB") -> dict[str, Path]:
    run = lambda *a: subprocess.run([*CLI, "--data-dir", str(tmp / "pub"), *a], check=True, capture_output=True, timeout=120)  # noqa: E731
    run("keygen", "--out", str(tmp / "key"))
    run("sample-model", str(tmp / "model"), "--size", size)
    run("publish", str(tmp / "model"), "--key", str(tmp / "key"), "--name", "demo/m", "--version", "1",
        "--out", str(tmp / "m.agm"), "--max-piece", piece)
    return {"model": tmp / "model", "manifest": tmp / "m.agm", "key": tmp / "key.pub"}


def start_mirror(procs: list[Proc], tmp: Path, model: Path) -> str:
    p = Proc([*CLI, "serve-mirror", str(model)], "mirror", tmp)
    procs.append(p)
    url = p.wait_for(lambda ln: ln.get("text", "").startswith("http://"), 30)["text"]
    return str(url)


def start_node(
    procs: list[Proc], tmp: Path, name: str, pub: dict[str, Path], *,
    bootstrap: list[str] = (), mirrors: list[str] = (), seed: bool = True, env: dict[str, str] | None = None,
    extra: list[str] = (),
) -> Proc:
    argv = [*CLI, "-v", "--data-dir", str(tmp / name), "join", "--json", "--trust", str(pub["key"]),
            "--out", str(tmp / f"{name}-out")]
    for b in bootstrap:
        argv += ["--bootstrap", b]
    for m in mirrors:
        argv += ["--mirror", m]
    if seed:
        argv += ["--seed", str(pub["manifest"])]
    argv += list(extra)
    p = Proc(argv, name, tmp, env)
    procs.append(p)
    p.event("ready", 60)
    return p


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


ADVERSARY = [sys.executable, str(Path(__file__).with_name("adversary.py"))]


def start_adversary(
    procs: list[Proc], tmp: Path, name: str, pub: dict[str, Path], mode: str, *,
    bootstrap: list[str] = (), extra: list[str] = (),
) -> Proc:
    """A hostile peer (tests/swarm/adversary.py): ``corrupt`` or ``lie``, for the manifest in ``pub``."""
    argv = [*ADVERSARY, mode, "--data-dir", str(tmp / name), "--model", str(pub["model"]), "--manifest", str(pub["manifest"])]
    for b in bootstrap:
        argv += ["--bootstrap", b]
    p = Proc([*argv, *extra], name, tmp)
    procs.append(p)
    p.event("ready", 60)
    return p
