"""Every ```python block in README.md and docs/*.md runs, against a real mirror process.

Blocks of one document run in order in one namespace (as a reader would
type them), in a fresh directory laid out as the docs assume (``tiny/``,
``publisher.pub``; see conftest.py), with ``$AUTOGLM_DATA_DIR`` pointing
into it. The only rewrite is the mirror's address: the docs say
``http://127.0.0.1:8080/``, the test's mirror listens on a free port.
Sketches that are not meant to run say so in the fence: ```python no-run
(or use another language, ```pyi, ```text); they are listed below so the
opt-out stays visible.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Served

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)
DOC_URL = "http://127.0.0.1:8080/"


def python_blocks(path: Path) -> list[tuple[str, str]]:
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 2
        out.append((f"{path.relative_to(REPO)}:{line}", m.group(1)))
    return out


DOCS_WITH_CODE = [p for p in DOCS if python_blocks(p)]
NO_RUN = re.compile(r"^```python[ \t]+no-run[ \t]*$", re.M)
#: The blocks that opted out of running, by document (a new one must be added here on purpose).
NOT_RUN = {"docs/huggingface.md": 1}


def test_blocks_that_do_not_run_are_few_and_known() -> None:
    found = {p.relative_to(REPO).as_posix(): len(NO_RUN.findall(p.read_text())) for p in DOCS}
    assert {k: v for k, v in found.items() if v} == NOT_RUN


def test_the_documents_that_must_have_examples_have_them() -> None:
    names = {p.relative_to(REPO).as_posix() for p in DOCS_WITH_CODE}
    assert {"docs/api.md", "docs/sandbox.md"} <= names


@pytest.mark.parametrize("doc", DOCS_WITH_CODE, ids=lambda p: p.relative_to(REPO).as_posix())
def test_doc_examples_run(doc: Path, served: Served, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(served.work, work, ignore=shutil.ignore_patterns(".publisher-data"))
    blocks = [(label, src.replace(DOC_URL, served.url)) for label, src in python_blocks(doc)]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    env = {**os.environ, "AUTOGLM_DATA_DIR": str(work / "data")}
    env.pop("AUTOGLM_NODE_HOME", None)
    r = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_run_blocks.py")), str(tmp_path / "blocks.json")],
        cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert r.returncode == 0, f"{doc.name}: an example failed\n{r.stdout}\n{r.stderr}"
    # Each block ran (the runner prints a marker per block before running it).
    assert r.stdout.count("--- ") == len(blocks), r.stdout
