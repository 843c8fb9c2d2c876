"""A published model served by a real ``autoglm-node serve-mirror`` process.

The layout is the one docs/api.md and docs/sandbox.md assume, in a fresh
directory: ``tiny/`` (the model files and the signed ``tiny.agm`` beside
them, served at the mirror's root), ``publisher`` / ``publisher.pub``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "autoglm.node.cli"]


@dataclass(frozen=True)
class Served:
    work: Path  # holds tiny/, publisher, publisher.pub
    url: str  # the mirror's base URL, ending in /

    @property
    def manifest_url(self) -> str:
        return self.url + "tiny.agm"

    @property
    def pub(self) -> Path:
        return self.work / "publisher.pub"


def cli(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def make_published(work: Path) -> None:
    env = {**os.environ, "AUTOGLM_DATA_DIR": str(work / ".publisher-data")}
    for args in (
        ("sample-model", work / "tiny", "--size", "1MiB"),
        ("keygen", "--out", work / "publisher"),
        ("publish", work / "tiny", "--key", work / "publisher", "--name", "org/tiny", "--version", "1",
         "--max-piece", "256KiB", "--out", work / "tiny" / "tiny.agm"),
    ):
        r = cli(*args, env=env)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("api-published")
    make_published(work)
    proc = subprocess.Popen([*CLI, "serve-mirror", str(work / "tiny")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()  # the readiness line
        assert url.startswith("http://127.0.0.1:"), url
        yield Served(work, url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
