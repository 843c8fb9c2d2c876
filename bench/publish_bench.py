"""Publish benchmark: `autoglm-node publish` against `sha256sum` (and `b3sum`) on one file.

The issue's target: publishing a model takes at most the time `sha256sum`
takes on the same bytes, with peak memory well under 200 MB. Publish reads
every byte once and computes both the file's SHA-256 and the BLAKE3 hash of
each piece, so this compares the whole CLI (interpreter start-up, planning,
hashing, signing, writing the manifest) with a plain one-hash tool. A
"build_manifest only" row runs the hashing pipeline in a bare interpreter, so
the CLI's start-up cost shows as the difference.

Method: one model directory with a safetensors file of --size bytes
(node/_sample.write_sample_model: tensor-aligned pieces, as for a real model)
under --workdir; the page cache is warmed; then --reps rounds, each running
sha256sum, b3sum and openssl (if on PATH) and publish once, alternating so drift in the
machine affects all of them alike. Wall time is measured around each process;
peak RSS and CPU time come from GNU time (/usr/bin/time). Medians are reported.

    .venv/bin/python bench/publish_bench.py            # 1 GiB, 5 rounds
    .venv/bin/python bench/publish_bench.py --size 256MiB --reps 3 --json out.json

``--kind bin`` publishes a plain binary file instead (random bytes, planned
by content-defined chunking, docs/manifest.md); ``--baseline-cli PATH`` adds
another autoglm-node (e.g. an older checkout's) to the same rounds, for a
before/after comparison:

    .venv/bin/python bench/publish_bench.py --kind bin --baseline-cli /work/main/.venv/bin/autoglm-node
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
_UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB}


def parse_size(text: str) -> int:
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num) :]
    if unit not in _UNITS or not num:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(float(num) * _UNITS[unit])


def autoglm_cmd() -> list[str]:
    """The installed console script if the venv has one, else `python -m`."""
    script = Path(sys.executable).with_name("autoglm-node")
    return [str(script)] if script.exists() else [sys.executable, "-m", "autoglm.node.cli"]


@dataclass
class Sample:
    wall: float
    cpu: float
    max_rss: int  # bytes


@dataclass
class Tool:
    name: str
    argv: list[str]
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


TIME = "/usr/bin/time"


def run_once(argv: list[str], env: dict[str, str], scratch: Path) -> Sample:
    """Run argv to completion; wall time, user+sys CPU and peak RSS of that process.

    Peak RSS comes from GNU time when it is installed: wait4() on a child we
    fork ourselves would also count this Python process's pages from before
    the exec (Linux keeps the pre-exec high-water mark).
    """
    report = scratch / "time.out"
    use_time = os.access(TIME, os.X_OK)
    full = [TIME, "-f", "%U %S %M", "-o", str(report), *argv] if use_time else argv
    t0 = time.perf_counter()
    proc = subprocess.run(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}")
    if use_time:
        user, sys_, rss_kib = report.read_text().split()[-3:]
        return Sample(wall, float(user) + float(sys_), int(rss_kib) * 1024)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # cumulative; rough without GNU time
    return Sample(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MiB)
        while f.readinto(buf):
            pass


def prepare(workdir: Path, size: int, env: dict[str, str], kind: str = "safetensors") -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO))
    from autoglm.node._sample import write_sample_model

    model = workdir / f"model-{kind}"
    weights = model / f"model.{kind}"
    if not weights.exists() or abs(weights.stat().st_size - size) > 64 * MiB:
        shutil.rmtree(model, ignore_errors=True)
        print(f"writing a {size / GiB:.2f} GiB sample {kind} file to {model} ...", file=sys.stderr, flush=True)
        if kind == "safetensors":
            write_sample_model(model, size=size, layers=8, seed=b"publish-bench")
        else:
            import blake3

            model.mkdir(parents=True)
            xof = blake3.blake3(b"publish-bench plain")
            with open(weights, "wb") as f:
                for off in range(0, size, 16 * MiB):
                    f.write(xof.digest(length=min(16 * MiB, size - off), seek=off))
    key = workdir / "publisher.key"
    if not key.exists():
        subprocess.run([*autoglm_cmd(), "keygen", "--out", str(key)], env=env, check=True, stdout=subprocess.DEVNULL)
    return model, key


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=GiB, help="model file size (default 1GiB)")
    ap.add_argument("--reps", type=int, default=5, help="alternating rounds (default 5)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/autoglm-publish-bench"))
    ap.add_argument("--max-piece", default="8MiB")
    ap.add_argument("--kind", choices=["safetensors", "bin"], default="safetensors",
                    help="a safetensors model (tensor-aligned pieces) or a plain binary file (content-defined)")
    ap.add_argument("--baseline-cli", type=Path, metavar="PATH",
                    help="another autoglm-node executable to publish the same file in the same rounds")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the model directory for the next run")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, AUTOGLM_NODE_HOME=str(args.workdir / "node"), LC_ALL="C")
    model, key = prepare(args.workdir, args.size, env, args.kind)
    weights = model / f"model.{args.kind}"
    nbytes = sum(p.stat().st_size for p in model.iterdir())
    warm(weights)

    tools = [Tool("sha256sum", ["sha256sum", str(weights)])]
    if shutil.which("b3sum"):
        tools.append(Tool("b3sum", ["b3sum", str(weights)]))
    if shutil.which("openssl"):  # SHA-256 with the CPU's SHA extensions, as hashlib uses
        tools.append(Tool("openssl dgst -sha256", ["openssl", "dgst", "-sha256", str(weights)]))
    out = args.workdir / "bench.agm"
    tools.append(
        Tool(
            "autoglm-node publish",
            [*autoglm_cmd(), "publish", str(model), "--key", str(key), "--name", "bench/model", "--version", "1",
             "--out", str(out), "--max-piece", args.max_piece, "--json"],
        )
    )
    if args.baseline_cli:
        tools.append(
            Tool(
                "baseline publish",
                [str(args.baseline_cli), "publish", str(model), "--key", str(key), "--name", "bench/model",
                 "--version", "1", "--out", str(out), "--max-piece", args.max_piece, "--json"],
            )
        )
    # The same hashing pipeline without the CLI: separates interpreter and
    # import start-up from the work itself.
    pipeline = (
        "import sys; from pathlib import Path; from autoglm.node._publish import build_manifest; "
        "build_manifest(Path(sys.argv[1]), name='bench/model', version='1', publisher='p', created_at=0, "
        "max_piece=int(sys.argv[2]))"
    )
    tools.append(Tool("build_manifest only", [sys.executable, "-c", pipeline, str(model),
                                              str(parse_size(args.max_piece))]))
    load_before = os.getloadavg()[0]
    for t in tools:  # one untimed run each: page cache, interpreter .pyc files
        out.unlink(missing_ok=True)  # publish refuses to overwrite a manifest
        run_once(t.argv, env, args.workdir)
    for _ in range(args.reps):
        for t in tools:
            out.unlink(missing_ok=True)
            t.samples.append(run_once(t.argv, env, args.workdir))

    sha = tools[0].median("wall")
    (pub,) = [t for t in tools if t.name == "autoglm-node publish"]
    print(f"\npublish benchmark: {weights.stat().st_size / GiB:.2f} GiB {args.kind} file "
          f"(model dir {nbytes / GiB:.2f} GiB), page cache warm, {args.reps} alternating rounds, medians")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {platform.system()} {platform.release()}, "
          f"load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after\n")
    header = f"{'command':<22} {'wall s':>8} {'min s':>7} {'max s':>7} {'GiB/s':>7} {'CPU s':>7} {'peak RSS':>10}"
    print(header)
    print("-" * len(header))
    for t in tools:
        walls = [s.wall for s in t.samples]
        w = t.median("wall")
        print(f"{t.name:<22} {w:>8.3f} {min(walls):>7.3f} {max(walls):>7.3f} {nbytes / GiB / w:>7.2f} "
              f"{t.median('cpu'):>7.2f} {max(s.max_rss for s in t.samples) / MiB:>7.1f} MiB")
    if not shutil.which("b3sum"):
        print(f"{'b3sum':<22} (not on PATH: skipped)")
    ratio = pub.median("wall") / sha
    peak = max(s.max_rss for s in pub.samples)
    print(f"\npublish / sha256sum = {ratio:.2f}  (target <= 1.00: {'met' if ratio <= 1 else 'NOT met'})")
    print(f"publish peak RSS = {peak / MiB:.1f} MiB  (target < 200 MB: {'met' if peak < 200e6 else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps({
            "bytes": nbytes, "reps": args.reps, "cpus": os.cpu_count(),
            "tools": {t.name: [vars(s) for s in t.samples] for t in tools},
            "ratio_publish_sha256sum": ratio, "publish_peak_rss": peak,
        }, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(model, ignore_errors=True)
    out.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
