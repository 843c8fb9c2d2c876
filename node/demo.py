"""The main job: a local demo swarm seeding a sample model from a mirror.

Everything runs as real processes on 127.0.0.1: one HTTP mirror
(``serve-mirror``) and N nodes (``join``) that fetch the model from each other
and from the mirror, verify every piece against the signed manifest, and then
check every file in the WebAssembly sandbox (``verify``). The summary shows
the time, the origin egress (bytes the mirror served ÷ model size) and the
verification result of every node.

    python -m autoglm.node.demo [--nodes 4] [--size 256MiB] [--workdir demo-out]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import DEVNULL, PIPE
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

from autoglm.node.cli._common import human_bytes
from autoglm.node.cli._manifest_cmds import parse_size

console = Console(highlight=False)
CLI = [sys.executable, "-m", "autoglm.node.cli"]


class DemoError(Exception):
    pass


class LineReader:
    """Lines from a process's stdout, with a deadline on each read."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = b""

    async def line(self) -> str:
        while b"\n" not in self._buf:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise DemoError("process closed its output")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    async def event(self, *names: str) -> dict[str, Any]:
        """The next JSON line whose "event" is one of ``names``."""
        while True:
            text = await self.line()
            try:
                ev = json.loads(text)
            except ValueError:
                continue
            if ev.get("event") in names:
                return dict(ev)


@asynccontextmanager
async def running(argv: list[str], log: Path) -> AsyncIterator[tuple[trio.Process, LineReader]]:
    """Start a process; on exit send SIGTERM (then SIGKILL) to it, by PID."""
    err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        proc = await trio.lowlevel.open_process(argv, stdout=PIPE, stderr=err, stdin=DEVNULL)
    finally:
        os.close(err)
    try:
        assert proc.stdout is not None
        yield proc, LineReader(proc.stdout)
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


def run_cli(*args: str) -> str:
    import subprocess

    res = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise DemoError(f"autoglm-node {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


@dataclass
class NodeResult:
    name: str
    seconds: float = 0.0
    by_source: dict[str, int] = field(default_factory=dict)
    verified: str = "-"


@dataclass
class Swarm:
    work: Path
    url: str
    pub: Path
    deadline: float
    results: list[NodeResult]
    boot: list[str] = field(default_factory=list)
    first_ready: trio.Event = field(default_factory=trio.Event)
    all_done: trio.Event = field(default_factory=trio.Event)
    done: int = 0


async def _node(i: int, sw: Swarm, bootstrap: str | None) -> None:
    work, url, pub, results = sw.work, sw.url, sw.pub, sw.results
    home = work / f"node{i}"
    argv = [*CLI, "--data-dir", str(home), "join", "--json", "--mirror", url,
            "--seed", url + "sample.agm", "--trust", str(pub), "--out", str(home / "model")]
    if bootstrap:
        argv += ["--bootstrap", bootstrap]
    res = results[i]
    async with running(argv, home / "node.log") as (_proc, out):
        with trio.fail_after(60):
            ev = await out.event("ready")
        sw.boot.append(ev["addrs"][0])
        sw.first_ready.set()
        with trio.fail_after(sw.deadline):
            ev = await out.event("complete", "seed-failed")
        if ev["event"] == "seed-failed":
            raise DemoError(f"node{i}: {ev['message']}")
        res.seconds = float(ev["seconds"])
        res.by_source = dict(ev["bytes_by_source"])
        sw.done += 1
        if sw.done == len(results):
            sw.all_done.set()
        # Keep serving until every node is done: the parent cancels us.
        await trio.sleep_forever()


def prepare(args: argparse.Namespace) -> tuple[Path, Path, Path, int]:
    """Sample model, publisher key, signed manifest on the mirror. Returns (work, mirror_dir, pub, size)."""
    work: Path = args.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)
    mirror_dir = work / "mirror"
    console.rule("[bold]autoglm-node demo[/]: a local swarm on 127.0.0.1")
    console.print(f"1. sample model of about {human_bytes(args.size)} in {mirror_dir}")
    run_cli("sample-model", str(mirror_dir), "--size", str(args.size))
    key = work / "publisher.key"
    kid = json.loads(run_cli("keygen", "--out", str(key), "--json"))["key_id"]
    pub = Path(str(key) + ".pub")
    info = json.loads(run_cli("--data-dir", str(work / "publisher"), "publish", str(mirror_dir), "--key", str(key),
                              "--name", "demo/sample", "--version", "1", "--out", str(mirror_dir / "sample.agm"), "--json"))
    console.print(f"2. signed manifest {info['id'][:16]}… by key {kid}: {info['files']} files, "
                  f"{info['pieces']} pieces, {human_bytes(info['size'])}")
    for i in range(args.nodes):
        (work / f"node{i}").mkdir(parents=True)
    return work, mirror_dir, pub, int(info["size"])


async def run_swarm(args: argparse.Namespace, work: Path, mirror_dir: Path, pub: Path) -> tuple[Swarm, float, int]:
    """Mirror plus N nodes until every node holds the verified model. Returns (swarm, wall, mirror bytes)."""
    async with running([*CLI, "serve-mirror", str(mirror_dir)], work / "mirror.log") as (mirror, mout):
        with trio.fail_after(30):
            url = await mout.line()
        console.print(f"3. mirror at {url}")
        sw = Swarm(work, url, pub, args.timeout, [NodeResult(f"node{i}") for i in range(args.nodes)])
        t0 = time.monotonic()
        console.print(f"4. starting {args.nodes} nodes (the first starts the network, the rest bootstrap from it)")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_node, 0, sw, None)
            with trio.fail_after(60):
                await sw.first_ready.wait()
            for i in range(1, args.nodes):
                nursery.start_soon(_node, i, sw, sw.boot[0])
            with trio.fail_after(args.timeout + 60):
                await sw.all_done.wait()
            wall = time.monotonic() - t0
            console.print(f"5. all {args.nodes} nodes hold the verified model after {wall:.1f}s")
            nursery.cancel_scope.cancel()
        mirror.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            stats = await mout.event("mirror-stats")
    return sw, wall, int(stats["body_bytes"])


def report(args: argparse.Namespace, work: Path, mirror_dir: Path, pub: Path, size: int,
           sw: Swarm, wall: float, served: int) -> int:
    console.print("6. sandbox check of every node's files (verify)")
    all_ok = True
    for i, r in enumerate(sw.results):
        home = work / f"node{i}"
        try:
            run_cli("--data-dir", str(home), "verify", str(home / "model"),
                    "--manifest", str(mirror_dir / "sample.agm"), "--trust", str(pub))
            r.verified = "[green]ok[/]"
        except DemoError as exc:
            r.verified = f"[red]refused[/] {exc}"
            all_ok = False
    table = Table(title="demo summary")
    for col in ("node", "time", "from peers", "from mirror", "sandbox"):
        table.add_column(col, justify="right" if col != "node" else "left")
    for r in sw.results:
        peers = sum(v for k, v in r.by_source.items() if not k.startswith(("mirror", "http")))
        mirror_b = sum(v for k, v in r.by_source.items() if k.startswith(("mirror", "http")))
        table.add_row(r.name, f"{r.seconds:.1f}s", human_bytes(peers), human_bytes(mirror_b), r.verified)
    console.print(table)
    console.print(f"wall time {wall:.1f}s for {args.nodes} nodes; origin egress {human_bytes(served)} "
                  f"= [bold]{served / size:.2f}×[/] the model size (without a swarm: {args.nodes}.00×)")
    console.print(f"logs and data in {work}")
    return 0 if all_ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autoglm.node.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--size", type=parse_size, default=256 << 20)
    p.add_argument("--workdir", type=Path, default=Path("demo-out"))
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a node may take")
    args = p.parse_args(argv)
    try:
        work, mirror_dir, pub, size = prepare(args)
        sw, wall, served = trio.run(run_swarm, args, work, mirror_dir, pub)
        return report(args, work, mirror_dir, pub, size, sw, wall, served)
    except (DemoError, trio.TooSlowError) as exc:
        console.print(f"[bold red]demo failed:[/] {exc!r}; see the logs in {args.workdir}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
