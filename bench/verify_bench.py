"""Sandbox verification cost, next to the reference parsers and scanners.

    .venv/bin/python bench/verify_bench.py [--gib 1] [--repeat 30] [--json]

Rows:
  * safetensors: the sandbox check of a file (read the header region, fresh
    wasmtime store, verify) next to ``safetensors.safe_open`` + ``keys()`` on
    the same file; target ratio <= 1.2.
  * torch zip pickles: the gate (zip central directory + sandbox) next to
    picklescan and fickling when they are installed (bench-only dependencies:
    ``.venv/bin/pip install picklescan fickling``).
  * a 1 GiB safetensors model: gate time relative to fetching the file over
    loopback HTTP (Python http.server + httpx), with one SHA-256 pass for
    reference (the integrity check against the manifest; the gate never
    hashes only to key its cache).

Timings are medians of ``--repeat`` runs after one warm-up (the wasm module
compile is per process and excluded, as a long-running node pays it once).
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from autoglm.node._gate import sha256_file, verify_path
from autoglm.wasm_verify import builtin_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "sandbox"))
from _corpus import write_torch_zip


def median_s(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def write_safetensors(path: Path, n_tensors: int, elems: int) -> Path:
    rng = np.random.default_rng(0)
    tensors = {f"model.layers.{i // 8}.mlp.proj_{i % 8}.weight": rng.standard_normal(elems).astype(np.float16) for i in range(n_tensors)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def safe_open_keys(path: Path) -> int:
    with safe_open(str(path), "numpy") as f:
        return len(list(f.keys()))


def bench_safetensors(tmp: Path, repeat: int) -> list[dict[str, object]]:
    rows = []
    for label, n, elems in [("10 tensors", 10, 1024), ("300 tensors (7B shard)", 300, 256), ("3000 tensors", 3000, 16), ("30000 tensors", 30000, 4)]:
        path = write_safetensors(tmp / f"st_{n}.safetensors", n, elems)
        ours = median_s(lambda p=path: verify_path(p), repeat)
        ref = median_s(lambda p=path: safe_open_keys(p), repeat)
        v = verify_path(path)
        assert v.ok, v.reason
        rows.append({"file": f"safetensors, {label}", "header_bytes": int.from_bytes(path.read_bytes()[:8], "little"),
                     "sandbox_ms": ours * 1e3, "reference": "safe_open", "reference_ms": ref * 1e3, "ratio": ours / ref})
    return rows


def bench_pickles(tmp: Path, repeat: int) -> list[dict[str, object]]:
    try:
        from picklescan.scanner import scan_file_path
    except ImportError:
        scan_file_path = None
    try:
        import fickling
    except ImportError:
        fickling = None
    rows = []
    for n in (10, 300, 3000):
        path = write_torch_zip(tmp / f"pt_{n}.bin", {f"layer.{i}.weight": ("F16", [4, 4]) for i in range(n)})
        v = verify_path(path)
        assert v.ok, v.reason
        ours = median_s(lambda p=path: verify_path(p), repeat)
        row: dict[str, object] = {"file": f"torch zip, {n} tensors", "sandbox_ms": ours * 1e3}
        if scan_file_path is not None:
            row["picklescan_ms"] = median_s(lambda p=path: scan_file_path(str(p)), repeat) * 1e3
        if fickling is not None:
            row["fickling_ms"] = median_s(lambda p=path: fickling.scan_zip_archive(str(p)), max(3, repeat // 5)) * 1e3
        rows.append(row)
    return rows


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def loopback_fetch_s(path: Path, dest: Path) -> float:
    import httpx

    handler = lambda *a, **k: _Quiet(*a, directory=str(path.parent), **k)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/{path.name}"
        start = time.perf_counter()
        with httpx.stream("GET", url, timeout=60) as r, dest.open("wb") as out:
            for chunk in r.iter_bytes(1 << 20):
                out.write(chunk)
        return time.perf_counter() - start
    finally:
        srv.shutdown()
        srv.server_close()


def bench_gib(tmp: Path, gib: float) -> dict[str, object]:
    n = 64
    elems = int(gib * (1 << 30)) // 2 // n
    path = write_safetensors(tmp / "model-1g.safetensors", n, elems)
    size = path.stat().st_size
    fetch = loopback_fetch_s(path, tmp / "fetched.safetensors")
    sandbox = median_s(lambda: verify_path(path), 5)
    t = time.perf_counter()
    sha256_file(path)
    sha = time.perf_counter() - t
    return {
        "file": f"safetensors {size / (1 << 30):.2f} GiB, {n} tensors",
        "fetch_loopback_s": fetch,
        "sandbox_s": sandbox,
        "sandbox_pct_of_fetch": 100 * sandbox / fetch,
        "sha256_s": sha,
        "sandbox_plus_sha256_pct_of_fetch": 100 * (sandbox + sha) / fetch,
        "hashlib_sha256": hashlib.sha256().name,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0, help="size of the large model (0 skips it)")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for kind in ("safetensors", "pickle", "gguf"):
        builtin_module(kind)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        st = bench_safetensors(tmp, args.repeat)
        pk = bench_pickles(tmp, args.repeat)
        big = bench_gib(tmp, args.gib) if args.gib > 0 else None
    if args.json:
        print(json.dumps({"safetensors": st, "pickle": pk, "model": big}, indent=2))
        return
    print(f"{'file':<36} {'header':>9} {'sandbox ms':>11} {'safe_open ms':>13} {'ratio':>6}")
    for r in st:
        print(f"{r['file']:<36} {r['header_bytes']:>9} {r['sandbox_ms']:>11.3f} {r['reference_ms']:>13.3f} {r['ratio']:>6.2f}")
    print()
    print(f"{'file':<36} {'sandbox ms':>11} {'picklescan ms':>14} {'fickling ms':>12}")
    for r in pk:
        ps = f"{r['picklescan_ms']:.3f}" if "picklescan_ms" in r else "n/a"
        fk = f"{r['fickling_ms']:.3f}" if "fickling_ms" in r else "n/a"
        print(f"{r['file']:<36} {r['sandbox_ms']:>11.3f} {ps:>14} {fk:>12}")
    if big:
        print()
        print(f"{big['file']}: loopback HTTP fetch {big['fetch_loopback_s']:.3f} s")
        print(f"  verification overhead (gate, header-only sandbox): {big['sandbox_s'] * 1e3:.2f} ms = {big['sandbox_pct_of_fetch']:.3f}% of fetch")
        print(f"  for reference, one SHA-256 pass over the file (the manifest integrity check, which fetch already does): "
              f"{big['sha256_s']:.3f} s = {100 * big['sha256_s'] / big['fetch_loopback_s']:.1f}% of fetch")


if __name__ == "__main__":
    main()
