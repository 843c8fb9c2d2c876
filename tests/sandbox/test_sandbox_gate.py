"""The gate: dispatch, verdict cache, open_model (signature, hashes, sandbox, fit) and the verify CLI."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from autoglm.node import _gate
from autoglm.node._device import CpuInfo, DeviceInfo, GpuInfo
from autoglm.node._gate import VerdictCache, check_fit, open_model, verify_path, verify_tree
from autoglm.node._manifests import write_signed_manifest
from autoglm.node._publish import build_manifest
from autoglm.node.cli._common import EXIT
from autoglm.node.errors import ConfigError, IntegrityError, VerificationRefused
from autoglm.protocol import (
    TrustPolicy,
    encode_public_key,
    generate_private_key,
    key_id,
    parse_public_key,
    sign_manifest,
)

from ._corpus import hostile_pickles, write_torch_zip

GiB = 1 << 30
BIG = DeviceInfo("Linux", "x86_64", "3.11", CpuInfo("cpu", 8, 4, ("avx2",)), 64 * GiB, 60 * GiB, 100 * GiB, None)


def tiny(ram: int) -> DeviceInfo:
    return replace(BIG, ram_total=ram, ram_available=ram)


def sign_dir(root: Path, mpath: Path, name: str) -> TrustPolicy:
    key = generate_private_key()
    pub = parse_public_key(encode_public_key(key))
    m = build_manifest(root, name=name, version="1", publisher=key_id(pub), created_at=int(time.time()))
    write_signed_manifest(mpath, sign_manifest(m, key))
    (mpath.parent / "key.pub").write_bytes(encode_public_key(key))
    return TrustPolicy(frozenset({pub}))


def make_model(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.zeros((64, 64), np.float32), "b": np.zeros(64, np.float16)}, str(root / "model.safetensors"))
    write_torch_zip(root / "pytorch_model.bin", {"w": ("F32", [64, 64])})
    (root / "config.json").write_text(json.dumps({"hidden_size": 64}))
    (root / "tokenizer.model").write_bytes(b"\x00\x01sentencepiece")
    return root


@pytest.fixture
def signed_model(tmp_path: Path) -> tuple[Path, Path, TrustPolicy]:
    root = make_model(tmp_path / "model")
    mpath = tmp_path / "tiny.agm"
    return root, mpath, sign_dir(root, mpath, "org/tiny")


def test_dispatch_by_extension_and_magic(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    (root / "modeling_evil.py").write_text("import os; os.system('id')")
    (root / "weird.bin").write_bytes(b"\x00" * 32)
    kinds = {p.name: (v.kind, v.status) for p, v in verify_tree(root)}
    assert kinds == {
        "config.json": ("json", "ok"),
        "model.safetensors": ("safetensors", "ok"),
        "pytorch_model.bin": ("torch_zip", "ok"),
        "tokenizer.model": ("text", "ok"),
        "modeling_evil.py": ("code", "reject"),
        "weird.bin": ("unknown", "reject"),
    }


def test_strict_json(tmp_path: Path) -> None:
    for text, ok in [('{"a": 1}', True), ('{"a": NaN}', False), ('{"a": 1, "a": 2}', False), ("{'a': 1}", False)]:
        p = tmp_path / "config.json"
        p.write_text(text)
        assert verify_path(p).ok is ok, text


def test_verdict_cache_hits_by_hash_and_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_model(tmp_path / "m")
    cache = VerdictCache.in_data_dir(tmp_path / "data")
    hashes = {p: _gate.sha256_file(p) for p in _gate.iter_model_files(root)}
    first = verify_tree(root, cache=cache, hashes=hashes)
    calls: list[Path] = []
    real = _gate._sandbox
    monkeypatch.setattr(_gate, "_sandbox", lambda path, *a: calls.append(path) or real(path, *a))
    second = verify_tree(root, cache=cache)  # no hashes given: the stat cache knows them
    assert [v.status for _, v in first] == [v.status for _, v in second]
    assert [v.tensor_count for _, v in first] == [v.tensor_count for _, v in second]
    assert calls == [root / "tokenizer.model"]  # text files are not cached; everything else hit
    (root / "config.json").write_text('{"changed": true}')
    calls.clear()
    verify_tree(root, cache=cache)
    assert root / "config.json" in calls  # a changed file is checked again
    cache.close()


def test_cache_is_not_a_reason_to_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_model(tmp_path / "m")
    cache = VerdictCache.in_data_dir(tmp_path / "data")
    monkeypatch.setattr(_gate, "sha256_file", lambda p: pytest.fail("hashed a file just for the cache"))
    assert all(v.ok for _, v in verify_tree(root, cache=cache))
    cache.close()


def test_cache_never_stores_errors(tmp_path: Path) -> None:
    cache = VerdictCache.in_data_dir(tmp_path)
    from autoglm.wasm_verify import Verdict

    cache.put("ab" * 32, Verdict("error", "safetensors", "deadline", pin="p"))
    assert cache.get("ab" * 32, "p") is None
    cache.close()


def test_open_model_happy_path(signed_model: tuple[Path, Path, TrustPolicy], tmp_path: Path) -> None:
    root, mpath, trust = signed_model
    h = open_model(root, manifest_path=mpath, trust=trust, device=BIG, data_dir=tmp_path / "d", load_tensors=True)
    assert {p.name for p in h.files} == {"model.safetensors", "pytorch_model.bin", "config.json", "tokenizer.model"}
    assert h.tensor_bytes == 64 * 64 * 4 + 64 * 2 + 64 * 64 * 4
    assert h.tensors is not None and h.tensors["w"].shape == (64, 64)
    assert h.manifest is not None and h.manifest.name == "org/tiny"


def test_open_model_refuses_tampered_unlisted_and_unsigned(signed_model: tuple[Path, Path, TrustPolicy]) -> None:
    root, mpath, trust = signed_model
    with pytest.raises(ConfigError, match="no signed manifest"):
        open_model(root, device=BIG)
    with pytest.raises(ConfigError, match="trust"):
        open_model(root, manifest_path=mpath, device=BIG)
    (root / "extra.json").write_text("{}")
    with pytest.raises(VerificationRefused, match="not listed"):
        open_model(root, manifest_path=mpath, trust=trust, device=BIG)
    (root / "extra.json").unlink()
    data = bytearray((root / "config.json").read_bytes())
    data[0] ^= 1
    (root / "config.json").write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        open_model(root, manifest_path=mpath, trust=trust, device=BIG)


def test_open_model_refuses_hostile_file_even_when_signed(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    write_torch_zip(root / "pytorch_model.bin", {}, pkl=hostile_pickles()["os_system_nested"][0])
    trust = sign_dir(root, tmp_path / "e.agm", "evil")
    with pytest.raises(VerificationRefused, match="os.system"):
        open_model(root, manifest_path=tmp_path / "e.agm", trust=trust, device=BIG)


def test_fit_uses_measured_bytes_not_the_manifest(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    with pytest.raises(VerificationRefused, match="tensors need"):
        open_model(root, require_signature=False, device=tiny(4096))
    assert open_model(root, require_signature=False, device=BIG).tensor_bytes > 4096


def test_check_fit_gpu_or_ram() -> None:
    gpu = replace(tiny(GiB), gpus=(GpuInfo(0, "H100", 80 * GiB, 79 * GiB, (9, 0)),))
    assert check_fit(10 * GiB, gpu) is None
    assert check_fit(100 * GiB, gpu) is not None and "GPU" in (check_fit(100 * GiB, gpu) or "")
    assert check_fit(512, tiny(GiB)) is None


def _cli(*args: str | Path, home: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run a verify/doctor command in-process, mapping errors to exit codes as main() does."""
    from autoglm.node.cli import _verify_cmds
    from autoglm.node.cli._common import exit_code_for
    from autoglm.node.errors import AutoglmError

    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, default=home)
    _verify_cmds.register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args([str(a) for a in args])
    capsys.readouterr()
    try:
        rc = int(ns.func(ns))
    except AutoglmError as exc:
        rc = exit_code_for(exc)
    return rc, capsys.readouterr().out


def test_cli_verify_ok_refused_and_json(
    signed_model: tuple[Path, Path, TrustPolicy], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, mpath, _ = signed_model
    home = tmp_path / "home"
    rc, out = _cli("verify", root, "--manifest", mpath, "--trust", tmp_path / "key.pub", home=home, capsys=capsys)
    assert rc == EXIT["ok"], out
    assert "signature and SHA-256" in out and "OK" in out
    bad = tmp_path / "bad"
    bad.mkdir()
    write_torch_zip(bad / "model.pt", {}, pkl=hostile_pickles()["stack_global_computed"][0])
    rc, out = _cli("verify", bad, home=home, capsys=capsys)
    assert rc == EXIT["refused"]
    assert "REFUSED" in out
    rc, out = _cli("verify", bad, "--json", home=home, capsys=capsys)
    doc = json.loads(out)
    assert rc == EXIT["refused"] and doc["ok"] is False
    assert doc["files"][0]["reason_code"] == "computed_global"
    assert "STACK_GLOBAL" in doc["files"][0]["reason"]


def test_cli_verify_hash_mismatch_is_an_integrity_error(
    signed_model: tuple[Path, Path, TrustPolicy], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, mpath, _ = signed_model
    (root / "config.json").write_text('{"hidden_size": 65}')
    rc, _ = _cli("verify", root, "--manifest", mpath, "--trust", tmp_path / "key.pub", home=tmp_path / "h", capsys=capsys)
    assert rc == EXIT["integrity"]


def test_real_cli_verify_json(tmp_path: Path) -> None:
    """The command is reachable through the installed entry point (a subprocess)."""
    env = {**os.environ, "AUTOGLM_NODE_HOME": str(tmp_path / "home")}
    probe = subprocess.run([sys.executable, "-c", "import autoglm.node.cli._main"], env=env, capture_output=True, text=True, timeout=60, check=False)
    if probe.returncode != 0 and "_verify_cmds" not in probe.stderr:
        pytest.skip(f"the CLI does not import for a reason outside the verify commands: {probe.stderr.strip().splitlines()[-1]}")
    root = make_model(tmp_path / "m")
    r = subprocess.run(
        [sys.executable, "-m", "autoglm.node.cli", "verify", str(root), "--json"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == EXIT["ok"], r.stdout + r.stderr
    assert json.loads(r.stdout)["ok"] is True


def test_open_model_by_name_uses_the_stored_signed_manifest(signed_model: tuple[Path, Path, TrustPolicy], tmp_path: Path) -> None:
    import sqlite3

    root, mpath, trust = signed_model
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    con = sqlite3.connect(data_dir / "store.sqlite")
    # the columns of the store's downloads table that the gate reads
    con.execute("CREATE TABLE downloads (out_dir TEXT, name TEXT, version TEXT, signed BLOB, created REAL, completed REAL)")
    con.execute("INSERT INTO downloads VALUES (?, 'org/tiny', '1', ?, 1.0, 2.0)", (str(root), mpath.read_bytes()))
    con.commit()
    con.close()
    (data_dir / "trust").mkdir()
    (data_dir / "trust" / "pub.pub").write_bytes((tmp_path / "key.pub").read_bytes())
    h = open_model("org/tiny@1", data_dir=data_dir, device=BIG)
    assert h.manifest is not None and h.root == root.resolve()
    with pytest.raises(ConfigError, match="neither a path nor a completed download"):
        open_model("org/tiny@2", data_dir=data_dir, device=BIG)
