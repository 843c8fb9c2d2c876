"""An update with --hf-cache, step by step: the Hub identity of a version that came by name, and SIGKILL at every step.

The identity (node/_hfversions.py): repo and commit from the signed manifest
(name hf:ORG/REPO, version the commit), an LFS file's blob named by its
SHA-256, any other by the git blob id of its bytes, LFS as the version's
.gitattributes says (the Hub's defaults without one, and every file of 10 MiB
or more). The kill test: a real child process runs the first i steps of
`plan_hf_switch` (pin, blobs, tree, snapshot, link, swap, record, prune, ref)
and SIGKILLs itself; refs/main must name a complete snapshot huggingface_hub
loads offline, whole, every time, and the next update finishes the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import save

from autoglm.node._hfversions import HfCache, HubTarget, hub_files, hub_target, plan_hf_switch
from autoglm.node._publish import build_manifest
from autoglm.node._update import rollback
from autoglm.node._versions import HubPin, VersionSet, apply_steps, resolve_current
from autoglm.node.errors import ConfigError, IntegrityError
from autoglm.node.hub._api import HubFile
from autoglm.node.hub._cache import repo_dir, snapshot_problem
from autoglm.protocol import SignedManifest, key_id, sign_manifest

C1, C2 = "1" * 40, "2" * 40
REPO = "acme/m"


def _git(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _version(root: Path, dirname: str, files: dict[str, bytes]) -> Path:
    d = root / "versions" / dirname
    for path, data in files.items():
        (d / path).parent.mkdir(parents=True, exist_ok=True)
        (d / path).write_bytes(data)
    return d


def _signed(d: Path, name: str, version: str) -> SignedManifest:
    key = Ed25519PrivateKey.generate()
    m = build_manifest(d, name=name, version=version, publisher=key_id(key.public_key().public_bytes_raw()), created_at=1)
    return sign_manifest(m, key)


def test_the_hub_identity_of_a_version_that_came_by_name(tmp_path: Path) -> None:
    big = save({"w": np.arange(4, dtype=np.float32)})
    files = {"model.safetensors": big, "config.json": b'{"a": 1}', "sub/data.bin": b"x" * 100, "notes.txt": b"hi\n"}
    d = _version(tmp_path, "v", files)
    signed = _signed(d, f"hf:{REPO}", C1)
    hf = HfCache(tmp_path / "cache")
    vs = VersionSet(tmp_path)
    t = hub_target(signed, hf, vs)
    assert (t.repo, t.revision, t.commit) == (REPO, "main", C1)
    got = {f.path: f for f in hub_files(signed, hf, d)}
    sha = hashlib.sha256(big).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(big)}\n".encode()
    # the Hub's default patterns: *.safetensors and *.bin are LFS (etag the SHA-256; blob id of the pointer)
    assert got["model.safetensors"] == HubFile("model.safetensors", len(big), _git(pointer), sha)
    assert got["sub/data.bin"].etag == hashlib.sha256(b"x" * 100).hexdigest()
    assert got["config.json"] == HubFile("config.json", 8, _git(b'{"a": 1}'), None)
    assert got["notes.txt"].etag == _git(b"hi\n")

    # the version's own .gitattributes decides, when it has one
    d2 = _version(tmp_path, "v2", {**files, ".gitattributes": b"# lfs\n*.txt filter=lfs diff=lfs merge=lfs -text\n"})
    got2 = {f.path: f for f in hub_files(_signed(d2, f"hf:{REPO}", C2), hf, d2)}
    assert got2["notes.txt"].lfs and not got2["model.safetensors"].lfs

    # a later version keeps the revision this root pinned; --hf-revision overrides
    (tmp_path / "versions" / "v").mkdir(exist_ok=True)
    vs.switch("v", keep=1)
    vs.pin_hub("v", HubPin(str(hf.cache), REPO, "release", C1))
    assert hub_target(signed, hf, vs).revision == "release"
    assert hub_target(signed, HfCache(hf.cache, "dev"), vs).revision == "dev"

    # bytes that are not the manifest's: refused
    (d / "config.json").write_bytes(b'{"a": 2}')
    with pytest.raises(IntegrityError):
        hub_files(signed, hf, d)


@pytest.mark.parametrize(("name", "version", "why"), [
    ("t/model", C1, "hf:ORG/REPO"), ("hf:no-slash", C1, "hf:ORG/REPO"), ("hf:acme/m", "v2", "not a Hub commit"),
])
def test_no_hub_identity_is_a_clear_error(tmp_path: Path, name: str, version: str, why: str) -> None:
    d = _version(tmp_path, "v", {"a.bin": b"a"})
    with pytest.raises(ConfigError, match=why):
        hub_target(_signed(d, name, version), HfCache(tmp_path / "cache"), VersionSet(tmp_path))
    with pytest.raises(ConfigError, match="branch or tag"):
        HfCache.from_wire({"cache": str(tmp_path), "revision": "../../x"})


V1 = {"model.safetensors": b"\x01" * 4096, "config.json": b'{"v": 1}', "sub/tok.txt": b"one\n"}
V2 = {"model.safetensors": b"\x02" * 4096, "config.json": b'{"v": 2}', "sub/tok.txt": b"one\n"}

_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from autoglm.node._hfversions import HubTarget, plan_hf_switch
    from autoglm.node._versions import VersionSet
    from autoglm.node.hub._api import HubFile
    root, cache, spec, upto = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    files = tuple(HubFile(**f) for f in spec["files"])
    steps = plan_hf_switch(VersionSet(root), "v2", 1, HubTarget(cache, "acme/m", "main", spec["commit"]), files)
    print(len(steps), flush=True)
    for _what, action in steps[:upto]:
        action()
    os.kill(os.getpid(), signal.SIGKILL)
""")

_LOAD = textwrap.dedent("""
    import json, sys
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    cache = sys.argv[1]
    snap = snapshot_download("acme/m", cache_dir=cache, local_files_only=True)
    files = {p: open(try_to_load_from_cache("acme/m", p, cache_dir=cache), "rb").read().hex()
             for p in ("model.safetensors", "config.json", "sub/tok.txt")}
    print(json.dumps([snap, files]))
""")


def _hub_files(files: dict[str, bytes]) -> tuple[HubFile, ...]:
    out = []
    for p, b in sorted(files.items()):
        lfs = p.endswith(".safetensors")
        out.append(HubFile(p, len(b), _git(b), hashlib.sha256(b).hexdigest() if lfs else None))
    return tuple(out)


def _offline(cache: Path, tmp: Path) -> tuple[str, dict[str, bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf-home"), HF_ENDPOINT="http://127.0.0.1:9")
    p = subprocess.run([sys.executable, "-c", _LOAD, str(cache)], capture_output=True, text=True, env=env, timeout=120,
                       check=True)
    snap, files = json.loads(p.stdout)
    return Path(snap).name, {k: bytes.fromhex(v) for k, v in files.items()}


def test_sigkill_after_every_step_leaves_refs_on_a_complete_snapshot(tmp_path: Path) -> None:
    n_steps = None
    upto = 0
    while n_steps is None or upto <= n_steps:
        base = tmp_path / f"s{upto}"
        root, cache = base / "m", base / "cache"
        vs = VersionSet(root)
        _version(root, "v1", V1)
        _version(root, "v2", V2)
        apply_steps(plan_hf_switch(vs, "v1", 1, HubTarget(cache, REPO, "main", C1), _hub_files(V1)))
        spec = {"commit": C2, "files": [{"path": f.path, "size": f.size, "blob_id": f.blob_id, "sha256": f.sha256}
                                        for f in _hub_files(V2)]}
        p = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(cache), json.dumps(spec), str(upto)],
                           capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == -signal.SIGKILL, p.stderr
        n_steps = int(p.stdout.split()[0])
        rd = repo_dir(cache, REPO)
        ref = (rd / "refs" / "main").read_text()
        assert ref == (C2 if upto == n_steps else C1), (upto, ref)  # the ref is the last step
        assert snapshot_problem(rd, ref) is None
        assert [x.name for x in (rd / "refs").iterdir()] == ["main"]
        cur = resolve_current(root)
        assert cur is not None and cur.name in ("v1", "v2")
        if upto in (0, 4, n_steps - 1, n_steps):  # huggingface_hub itself, offline (a few steps: it is slow to start)
            assert _offline(cache, base) == (ref, V1 if ref == C1 else V2), upto
        # what the kill left is finished by the next update; rollback then gives v1 to huggingface_hub again
        apply_steps(plan_hf_switch(vs, "v2", 1, HubTarget(cache, REPO, "main", C2), _hub_files(V2)))
        assert (rd / "refs" / "main").read_text() == C2 and snapshot_problem(rd, C2) is None
        res = rollback(root, keep=1)
        assert res.hub is not None and res.hub.commit == C1 and (rd / "refs" / "main").read_text() == C1
        upto += 1
    assert n_steps == 9
    # one copy of the bytes: each blob is the version's file
    rd = repo_dir(tmp_path / "s0" / "cache", REPO)
    blob = (rd / "snapshots" / C2 / "model.safetensors").resolve()
    assert blob.stat().st_ino == (tmp_path / "s0" / "m" / "versions" / "v2" / "model.safetensors").stat().st_ino


_LOOP = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from autoglm.node._hfversions import HubTarget, plan_hf_switch
    from autoglm.node._versions import VersionSet, apply_steps
    from autoglm.node.hub._api import HubFile
    import autoglm.node.hub._publish  # imported by the first switch: loaded before "go", not in the kill window
    root, cache, specs, start = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    vs = VersionSet(root)
    print("go", flush=True)
    i = 0
    while True:
        s = specs[i % 2]
        files = tuple(HubFile(**f) for f in s["files"])
        commit = f"{start + i:039x}{i % 2}"  # a new commit each time (a snapshot not yet there); last digit: v1/v2
        apply_steps(plan_hf_switch(vs, s["dirname"], 2, HubTarget(cache, "acme/m", "main", commit), files))
        i += 1
""")


def test_random_sigkill_while_a_reader_loads_through_refs(tmp_path: Path) -> None:
    """A real process moves v1 -> v2 -> v1 ... with --hf-cache and is SIGKILLed at random; a reader here
    resolves refs/main and reads the snapshot's files as huggingface_hub does: always one whole commit.
    Each switch is to a new commit, so a ref moved before its snapshot is complete would be seen."""
    root, cache = tmp_path / "m", tmp_path / "cache"
    vs = VersionSet(root)
    want = {"1": V1, "0": V2}  # by a commit's last digit
    _version(root, "v1", V1)
    _version(root, "v2", V2)
    apply_steps(plan_hf_switch(vs, "v1", 2, HubTarget(cache, REPO, "main", C1), _hub_files(V1)))
    specs = [{"dirname": d, "files": [{"path": f.path, "size": f.size, "blob_id": f.blob_id, "sha256": f.sha256}
                                       for f in _hub_files(v)]} for d, v in (("v2", V2), ("v1", V1))]
    rd = repo_dir(cache, REPO)
    stop = threading.Event()
    seen: list[str] = []
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                commit = (rd / "refs" / "main").read_text()
                got = {p: (rd / "snapshots" / commit / p).read_bytes() for p in V1}
                if got != want[commit[-1]]:
                    problems.append(f"{commit[:4]}: a file of another commit")
                seen.append(commit)
            except (OSError, KeyError) as exc:
                problems.append(repr(exc))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    rng = random.Random(41)
    try:
        for n in range(10):
            p = subprocess.Popen([sys.executable, "-c", _LOOP, str(root), str(cache), json.dumps(specs), str(n << 32)],
                                 stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None and p.stdout.readline().strip() == "go"
            time.sleep(rng.uniform(0.05, 0.6))
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
            ref = (rd / "refs" / "main").read_text()
            assert snapshot_problem(rd, ref) is None
            assert [x.name for x in (rd / "refs").iterdir()] == ["main"]
    finally:
        stop.set()
        t.join(timeout=10)
    assert not problems, problems[:5]
    assert len(set(seen)) > 2, "the reader never saw the switches"
