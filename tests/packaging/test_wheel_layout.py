"""`python -m build` makes an sdist and a wheel without setuptools warnings; the wheel
installs only autoglm/... packages, with their py.typed markers, the license and the
console script, and runs `autoglm-node doctor --json` from a fresh virtual environment.

Builds offline (`--no-isolation`, the venv's own setuptools) from a copy of the
source tree, so a stale build/ in the checkout cannot leak into the wheel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "node", "protocol", "wasm_verify",
           "scripts/build-wasm"]
# What setuptools prints when the configuration is deprecated or ambiguous.
WARNING = re.compile(r"\w+Warning\b|^\s*!!\s*$", re.M)


@dataclass
class Built:
    wheel: Path
    sdist: Path
    log: str


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        p = REPO / name
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True, text=True, timeout=170, check=False,
    )
    if r.returncode != 0 and "No module named build" in r.stderr:
        pytest.skip("the venv has no `build`: pip install -e '.[test]'")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = out.glob("autoglm_node-*.whl")
    (sdist,) = out.glob("autoglm_node-*.tar.gz")
    return Built(whl, sdist, r.stdout + r.stderr)


@pytest.fixture(scope="module")
def wheel(built: Built) -> zipfile.ZipFile:
    return zipfile.ZipFile(built.wheel)


@pytest.mark.timeout(180)
def test_build_prints_no_setuptools_warning(built: Built) -> None:
    assert not WARNING.findall(built.log), [ln for ln in built.log.splitlines() if WARNING.search(ln)]


@pytest.mark.timeout(180)
def test_only_autoglm_packages(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"autoglm"}, sorted(tops)
    for pkg in ("node", "protocol", "wasm_verify", "tests", "bench", "scripts"):
        assert not any(n.startswith(f"{pkg}/") for n in names), pkg


@pytest.mark.timeout(180)
def test_packages_markers_and_data_present(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for required in (
        "autoglm/protocol/py.typed",
        "autoglm/node/py.typed",
        "autoglm/protocol/__init__.py",
        "autoglm/protocol/_manifest.py",
        "autoglm/node/__init__.py",
        "autoglm/node/_publish.py",
        "autoglm/node/_settings.py",
        "autoglm/node/cli/__main__.py",
        "autoglm/node/cli/_config_cmds.py",
        "autoglm/wasm_verify/__init__.py",
        "autoglm/wasm_verify/pins.json",
        *(f"autoglm/wasm_verify/{p.name}" for p in (REPO / "wasm_verify").glob("*.wasm")),
    ):
        assert required in names, required
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert not any(n.startswith("autoglm/wasm_verify/src/") for n in names)  # C sources: sdist only


@pytest.mark.timeout(180)
def test_license_metadata(wheel: zipfile.ZipFile) -> None:
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    text = wheel.read(meta).decode()
    assert "License-Expression: Apache-2.0" in text
    assert "License-File: LICENSE" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel.namelist())


@pytest.mark.timeout(180)
def test_sdist_carries_the_verifier_sources(built: Built) -> None:
    with tarfile.open(built.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for required in ("pyproject.toml", "LICENSE", "README.md", "scripts/build-wasm", "wasm_verify/pins.json",
                     *(f"wasm_verify/src/{p.name}" for p in (REPO / "wasm_verify" / "src").iterdir())):
        assert required in names, required


@pytest.mark.timeout(180)
def test_console_script(wheel: zipfile.ZipFile) -> None:
    (ep,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(ep).decode()
    assert "autoglm-node = autoglm.node.cli._main:_entry" in text


@pytest.mark.timeout(180)
def test_wheel_runs_doctor_from_a_fresh_venv(built: Built, tmp_path: Path) -> None:
    """Offline: the wheel goes into a new venv with --no-deps; the dependencies are this
    venv's, reached through a .pth line (a path entry only: this venv's editable
    autoglm install is not activated there). `pip check` then proves the wheel's
    declared requirements are met by what is importable."""
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOGLM_", "PYTHON"))}
    env.update({"AUTOGLM_NODE_CONFIG": "", "AUTOGLM_DATA_DIR": str(tmp_path / "data"), "HOME": str(tmp_path)})
    probe = [str(py), "-c", "import autoglm.node"]
    assert subprocess.run(probe, capture_output=True, cwd=tmp_path, env=env, timeout=30).returncode != 0

    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index", "--no-deps",
                        "-q", str(built.wheel)], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    where = subprocess.run([str(py), "-c", "import autoglm.node.cli as c; print(c.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, env=env, timeout=30, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where

    cli = venv / "bin" / "autoglm-node"
    r = subprocess.run([str(cli), "doctor", "--json"], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120, check=False)
    report = json.loads(r.stdout)
    assert {c["name"] for c in report["checks"]} >= {"data-dir", "sandbox"}, report["checks"]
    sandbox = next(c for c in report["checks"] if c["name"] == "sandbox")
    assert sandbox["status"] == "pass", sandbox  # the .wasm verifiers came with the wheel
    assert r.returncode == (0 if report["ok"] else 1), r.stderr
    r = subprocess.run([str(cli), "--version"], capture_output=True, text=True, env=env, timeout=30, check=True)
    assert r.stdout.strip() == "autoglm-node 0.1.0"
    r = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True, env=env, timeout=60,
                       check=False)
    assert r.returncode == 0 or "No module named pip" in r.stderr, r.stdout + r.stderr
