"""The wheel installs only autoglm/... packages, with their py.typed markers.

Builds offline from a copy of the source tree (so a stale build/ in the
checkout cannot leak into the wheel) with the venv's own setuptools.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "node", "protocol", "wasm_verify"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif p.exists():
            shutil.copy2(p, src / name)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=55, check=False,
    )
    if r.returncode != 0 and "invalid command 'bdist_wheel'" in r.stdout + r.stderr:
        pytest.skip("the venv's setuptools has no bdist_wheel: install 'wheel' or setuptools>=70.1 into it")
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("autoglm_node-*.whl")
    return zipfile.ZipFile(whl)


@pytest.mark.timeout(60)
def test_only_autoglm_packages(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"autoglm"}, sorted(tops)
    for pkg in ("node", "protocol", "wasm_verify", "tests", "bench", "scripts"):
        assert not any(n.startswith(f"{pkg}/") for n in names), pkg


@pytest.mark.timeout(60)
def test_packages_and_markers_present(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for required in (
        "autoglm/protocol/py.typed",
        "autoglm/node/py.typed",
        "autoglm/protocol/__init__.py",
        "autoglm/protocol/_manifest.py",
        "autoglm/node/__init__.py",
        "autoglm/node/_publish.py",
        "autoglm/node/cli/__main__.py",
        "autoglm/wasm_verify/__init__.py",
    ):
        assert required in names, required
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


@pytest.mark.timeout(60)
def test_console_script(wheel: zipfile.ZipFile) -> None:
    (ep,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(ep).decode()
    assert "autoglm-node = autoglm.node.cli._main:_entry" in text
