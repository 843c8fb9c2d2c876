"""Replay every input the coverage-guided fuzzer (bench/fuzz.py) kept, plus each target's seeds.

A file in fuzz_crashes/<target>/ once made that decoder raise something other
than its documented errors; after the fix it must parse or raise those only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz_targets import EXPECTED, TARGETS, seeds

CRASHES = Path(__file__).parent / "fuzz_crashes"
CASES = sorted((p.parent.name, p) for p in CRASHES.glob("*/*") if p.is_file() and p.parent.name in TARGETS)


def _run(target: str, data: bytes) -> None:
    try:
        TARGETS[target](data)
    except EXPECTED:
        pass


@pytest.mark.parametrize(("target", "path"), CASES, ids=[f"{t}/{p.name[:16]}" for t, p in CASES])
def test_kept_fuzz_input(target: str, path: Path) -> None:
    _run(target, path.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds_and_their_prefixes(target: str) -> None:
    for seed in seeds(target):
        for n in range(0, len(seed) + 1, max(1, len(seed) // 64)):
            _run(target, seed[:n])
