"""docs/architecture.md names every module of node/ and protocol/ (so a new one cannot go unexplained)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "architecture.md").read_text()
# Every name written in backticks, and each part of a backticked list ("`a`, `b`") or path ("swarm/").
NAMED = {w.strip("/") for w in re.findall(r"`([^`\s]+)`", DOC)}


def _modules() -> list[str]:
    out = []
    for pkg in ("node", "protocol"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            if p.stem not in ("__init__", "__main__"):
                out.append(str(p.relative_to(ROOT)))
    return out


@pytest.mark.parametrize("path", _modules())
def test_module_is_named_in_the_architecture(path: str) -> None:
    stem = Path(path).stem
    assert stem in NAMED, f"{path} is not named in docs/architecture.md (as `{stem}`)"


@pytest.mark.parametrize("pkg", ["node/swarm", "node/cli"])
def test_subpackage_is_named(pkg: str) -> None:
    assert f"`{pkg.split('/')[1]}/`" in DOC


def test_layers_import_downwards_only() -> None:
    """protocol/ imports nothing of node/ or wasm_verify/; wasm_verify/ nothing of node/."""
    for pkg, banned in (("protocol", ("autoglm.node", "autoglm.wasm_verify")), ("wasm_verify", ("autoglm.node",))):
        for p in (ROOT / pkg).rglob("*.py"):
            text = p.read_text()
            for b in banned:
                assert f"from {b}" not in text and f"import {b}" not in text, f"{p.relative_to(ROOT)} imports {b}"
