"""Coverage-guided fuzzing of every protocol decoder with atheris (libFuzzer for Python).

    .venv/bin/pip install atheris          # optional: declared as the `fuzz` extra
    .venv/bin/python bench/fuzz.py --seconds 120            # every target, 2 min each
    .venv/bin/python bench/fuzz.py --target control --seconds 600

Each target (tests/protocol/fuzz_targets.py) runs in its own process, starting
from its seeds plus the corpus kept in WORKDIR/corpus/<target> between runs.
Only protocol/ is instrumented. An input that makes a decoder raise anything
but its documented errors (or exceed the per-input time or RSS limit) is
copied to tests/protocol/fuzz_crashes/<target>/, where
tests/protocol/test_fuzz_regressions.py replays it on every test run. The
script prints one table row per target: seconds, executions, corpus size,
coverage (libFuzzer's "cov"), crashes kept.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS_DIR = REPO / "tests" / "protocol"
CRASHES = TARGETS_DIR / "fuzz_crashes"


def _child(target: str, args: list[str]) -> None:
    """Runs inside the fuzzing process: instrument protocol/, then hand over to libFuzzer."""
    import atheris

    sys.path.insert(0, str(TARGETS_DIR))
    with atheris.instrument_imports(include=["autoglm.protocol"]):
        import fuzz_targets
    fn = fuzz_targets.TARGETS[target]
    expected = fuzz_targets.EXPECTED

    def one(data: bytes) -> None:
        try:
            fn(data)
        except expected:
            pass

    atheris.Setup([sys.argv[0], *args], one)
    atheris.Fuzz()


def _run(target: str, seconds: int, workdir: Path, rss_mb: int) -> dict[str, object]:
    sys.path.insert(0, str(TARGETS_DIR))
    import fuzz_targets

    corpus = workdir / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in fuzz_targets.seeds(target):
        (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    artifacts = workdir / "artifacts" / target
    artifacts.mkdir(parents=True, exist_ok=True)
    libfuzzer = [f"-max_total_time={seconds}", "-timeout=10", f"-rss_limit_mb={rss_mb}", "-max_len=65536",
                 f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus)]
    proc = subprocess.run([sys.executable, __file__, "--child", target, "--", *libfuzzer],
                          capture_output=True, text=True, timeout=seconds + 120, check=False)
    log = proc.stdout + proc.stderr
    kept = []
    for art in sorted(artifacts.iterdir()):
        dest = CRASHES / target / hashlib.sha1(art.read_bytes()).hexdigest()
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(art, dest)
        kept.append(dest)
        art.unlink()
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    cov = re.findall(r"cov: (\d+)", log)
    if proc.returncode != 0 and not kept:  # the fuzzer itself failed: show why
        sys.stderr.write(log[-4000:])
    return {"target": target, "seconds": seconds, "execs": int(execs[-1]) if execs else 0,
            "corpus": len(list(corpus.iterdir())), "cov": int(cov[-1]) if cov else 0,
            "crashes": kept, "rc": proc.returncode, "tail": log[-1500:] if kept else ""}


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[4:])
        return 0
    sys.path.insert(0, str(TARGETS_DIR))
    import fuzz_targets

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", choices=sorted(fuzz_targets.TARGETS))
    ap.add_argument("--seconds", type=int, default=120, help="per target (default 120)")
    ap.add_argument("--rss-mb", type=int, default=1024, help="libFuzzer's per-process RSS limit")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "autoglm-fuzz")
    args = ap.parse_args()
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("bench/fuzz.py needs atheris: .venv/bin/pip install atheris", file=sys.stderr)
        return 2
    print(f"| target | seconds | executions | corpus | cov | crashes kept |  (python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs)")
    print("|---|---|---|---|---|---|")
    found = 0
    for target in args.target or sorted(fuzz_targets.TARGETS):
        r = _run(target, args.seconds, args.workdir, args.rss_mb)
        crashes = r["crashes"]
        assert isinstance(crashes, list)
        found += len(crashes)
        names = ", ".join(p.name[:12] for p in crashes) or "0"
        print(f"| {target} | {r['seconds']} | {r['execs']} | {r['corpus']} | {r['cov']} | {names} |", flush=True)
        if crashes:
            print(r["tail"], file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
