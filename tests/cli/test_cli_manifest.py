"""The real CLI in subprocesses: keygen, publish, inspect, verify-manifest, --help, --data-dir."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest

from autoglm.node._sample import write_sample_model
from autoglm.node.cli._common import EXIT
from autoglm.node.cli._main import build_parser
from autoglm.protocol import SignedManifest, decode_signed_manifest, key_id, parse_public_key

TIMEOUT = 60


@dataclass
class Cli:
    argv: list[str]
    env: dict[str, str]

    def __call__(self, *args: str | Path, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
        pre = ["--data-dir", str(data_dir)] if data_dir else []
        return subprocess.run(
            [*self.argv, *pre, *map(str, args)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def cli(home: Path) -> Cli:
    import sys

    env = dict(os.environ)
    # Never touch the real user data dir; a wide terminal keeps rich tables unwrapped.
    env.update({"AUTOGLM_NODE_HOME": str(home / "default-node"), "COLUMNS": "200", "NO_COLOR": "1"})
    return Cli([sys.executable, "-m", "autoglm.node.cli"], env)


@dataclass
class Published:
    model: Path
    key: Path
    manifest: Path
    data_dir: Path
    key_id: str


@pytest.fixture(scope="module")
def published(cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> Published:
    base = tmp_path_factory.mktemp("pub")
    model = base / "model"
    write_sample_model(model, size=512 * 1024, layers=2)
    (model / "sub").mkdir()
    (model / "sub" / "notes.txt").write_text("hello\n")
    key = base / "keys" / "publisher.key"
    r = cli("keygen", "--out", key, "--json")
    assert r.returncode == 0, r.stderr
    kid = json.loads(r.stdout)["key_id"]
    data_dir = base / "node-a"
    r = cli("publish", model, "--key", key, "--name", "org/tiny", "--version", "1.0", "--max-piece", "64KiB",
            data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    manifest = data_dir / "published" / "org--tiny@1.0.agm"
    assert manifest.is_file()
    assert str(manifest) in r.stdout
    return Published(model, key, manifest, data_dir, kid)


def test_keygen_writes_private_key_0600_and_public_key(cli: Cli, tmp_path: Path) -> None:
    key = tmp_path / "k" / "pub.key"
    r = cli("keygen", "--out", key)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pub = parse_public_key((tmp_path / "k" / "pub.key.pub").read_bytes())
    assert f"key id {key_id(pub)}" in r.stdout
    assert b"PRIVATE KEY" in key.read_bytes()


def test_keygen_refuses_to_overwrite(cli: Cli, tmp_path: Path) -> None:
    key = tmp_path / "pub.key"
    assert cli("keygen", "--out", key).returncode == 0
    before = key.read_bytes()
    r = cli("keygen", "--out", key)
    assert r.returncode == EXIT["usage"]
    assert "already exists; pass --force" in r.stderr
    assert key.read_bytes() == before
    assert cli("keygen", "--out", key, "--force").returncode == 0
    assert key.read_bytes() != before


def test_publish_default_out_is_in_data_dir(published: Published) -> None:
    assert published.manifest == published.data_dir / "published" / "org--tiny@1.0.agm"


def test_inspect_table(cli: Cli, published: Published) -> None:
    r = cli("inspect", published.manifest)
    assert r.returncode == 0, r.stderr
    for text in ("org/tiny", "1.0", "config.json", "model.safetensors", "sub/notes.txt", "total",
                 "valid signature", published.key_id):
        assert text in r.stdout


def test_inspect_json_lists_every_file_and_piece(cli: Cli, published: Published) -> None:
    r = cli("inspect", "--json", published.manifest)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["name"] == "org/tiny" and doc["version"] == "1.0"
    assert doc["signer"] == published.key_id and doc["signature_valid"] is True
    assert doc["max_piece_size"] == 64 * 1024
    on_disk = sorted(p.relative_to(published.model).as_posix() for p in published.model.rglob("*") if p.is_file())
    assert [f["path"] for f in doc["files"]] == on_disk
    for f in doc["files"]:
        data = (published.model / f["path"]).read_bytes()
        assert f["size"] == len(data)
        assert f["sha256"] == hashlib.sha256(data).hexdigest()
        assert f["pieces"], f["path"]
        pos = 0
        for p in f["pieces"]:
            assert set(p) == {"offset", "length", "hash"}
            assert p["offset"] == pos and 0 < p["length"] <= 64 * 1024
            assert p["hash"] == blake3.blake3(data[pos : pos + p["length"]]).hexdigest()
            pos += p["length"]
        assert pos == len(data)
    assert doc["total_size"] == sum(f["size"] for f in doc["files"])


def test_verify_manifest_with_the_right_key(cli: Cli, published: Published) -> None:
    r = cli("verify-manifest", published.manifest, "--trust", f"{published.key}.pub")
    assert r.returncode == EXIT["ok"], r.stderr
    assert "valid" in r.stdout and published.key_id in r.stdout
    r = cli("verify-manifest", "--json", published.manifest, "--trust", f"{published.key}.pub")
    assert json.loads(r.stdout)["valid"] is True


def test_verify_manifest_with_a_wrong_key(cli: Cli, published: Published, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    assert cli("keygen", "--out", other).returncode == 0
    r = cli("verify-manifest", published.manifest, "--trust", f"{other}.pub")
    assert r.returncode == EXIT["trust"]
    assert f"publisher key {published.key_id} is not trusted" in r.stderr


def test_verify_manifest_with_no_trust_says_how_to_fix(cli: Cli, published: Published, tmp_path: Path) -> None:
    r = cli("verify-manifest", published.manifest, data_dir=tmp_path / "empty-node")
    assert r.returncode == EXIT["trust"]
    assert "--trust" in r.stderr


def _signed(path: Path) -> SignedManifest:
    return decode_signed_manifest(path.read_bytes())


def test_verify_manifest_tampered(cli: Cli, published: Published, tmp_path: Path) -> None:
    data = bytearray(published.manifest.read_bytes())
    data[bytes(data).index(_signed(published.manifest).manifest.files[-1].pieces[0].hash)] ^= 0x01
    bad = tmp_path / "tampered.agm"
    bad.write_bytes(bytes(data))
    r = cli("verify-manifest", bad, "--trust", f"{published.key}.pub")
    assert r.returncode == EXIT["integrity"]
    assert "signature does not verify" in r.stderr
    r = cli("inspect", "--json", bad)
    assert r.returncode == 0 and json.loads(r.stdout)["signature_valid"] is False
    r = cli("inspect", bad)
    assert "INVALID signature" in r.stdout


def test_verify_manifest_truncated(cli: Cli, published: Published, tmp_path: Path) -> None:
    data = published.manifest.read_bytes()
    bad = tmp_path / "truncated.agm"
    bad.write_bytes(data[: len(data) - 10])
    r = cli("verify-manifest", bad, "--trust", f"{published.key}.pub")
    assert r.returncode == EXIT["malformed"]
    assert "malformed msgpack" in r.stderr
    bad.write_bytes(b"<html>not found</html>")
    r = cli("verify-manifest", bad, "--trust", f"{published.key}.pub")
    assert r.returncode == EXIT["malformed"]
    assert "looks like HTML" in r.stderr


def test_verify_manifest_missing_file(cli: Cli, published: Published, tmp_path: Path) -> None:
    r = cli("verify-manifest", tmp_path / "nope.agm", "--trust", f"{published.key}.pub")
    assert r.returncode == EXIT["usage"]
    assert "cannot read manifest" in r.stderr


def test_data_dir_isolates_nodes(cli: Cli, published: Published, tmp_path: Path) -> None:
    node_a, node_b = tmp_path / "a", tmp_path / "b"
    (node_a / "trust").mkdir(parents=True)
    (node_a / "trust" / "publisher.pub").write_bytes(Path(f"{published.key}.pub").read_bytes())
    assert cli("verify-manifest", published.manifest, data_dir=node_a).returncode == EXIT["ok"]
    assert cli("verify-manifest", published.manifest, data_dir=node_b).returncode == EXIT["trust"]
    r = cli("publish", published.model, "--key", published.key, "--name", "iso", "--version", "2", data_dir=node_b)
    assert r.returncode == 0, r.stderr
    assert (node_b / "published" / "iso@2.agm").is_file()
    assert not (node_a / "published").exists()


def test_publish_with_explicit_out_and_json(cli: Cli, published: Published, tmp_path: Path) -> None:
    out = tmp_path / "m.agm"
    r = cli("publish", published.model, "--key", published.key, "--name", "x", "--version", "1", "--out", out,
            "--json", "--max-piece", "64KiB")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["manifest"] == str(out) and out.is_file()
    m = _signed(out).manifest
    assert doc["id"] == hashlib.sha256(m.encode()).hexdigest()
    assert doc["files"] == len(m.files) and doc["pieces"] == m.piece_count


def test_publish_refuses_a_world_readable_key(cli: Cli, published: Published, tmp_path: Path) -> None:
    key = tmp_path / "loose.key"
    key.write_bytes(published.key.read_bytes())
    key.chmod(0o644)
    r = cli("publish", published.model, "--key", key, "--name", "x", "--version", "1", "--out", tmp_path / "o.agm")
    assert r.returncode == EXIT["usage"]
    assert "chmod 600" in r.stderr
    assert not (tmp_path / "o.agm").exists()


def test_publish_with_a_parent_records_its_id(cli: Cli, published: Published, tmp_path: Path) -> None:
    out = tmp_path / "v2.agm"
    r = cli("publish", published.model, "--key", published.key, "--name", "org/tiny", "--version", "2.0",
            "--parent", published.manifest, "--out", out)
    assert r.returncode == 0, r.stderr
    assert _signed(out).manifest.parent == _signed(published.manifest).id


def _subcommands() -> list[str]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    raise AssertionError("no subcommands")


def test_the_manifest_commands_exist() -> None:
    assert {"keygen", "publish", "inspect", "verify-manifest", "sample-model"} <= set(_subcommands())


@pytest.mark.parametrize("command", [None, "publish", "verify-manifest"])
def test_help_in_a_subprocess(cli: Cli, command: str | None) -> None:
    r = cli(*([command] if command else []), "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: autoglm-node")
    if command:
        assert command in r.stdout.splitlines()[0]
    else:
        assert "Exit codes" in r.stdout
        assert all(c in r.stdout for c in _subcommands())


@pytest.mark.parametrize("command", _subcommands())
def test_help_on_every_subcommand(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """In-process: each CLI start pays for importing every command module, so 13 starts add up."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: autoglm-node {command}")
    assert "-h, --help" in out


def test_usage_error_exit_code(cli: Cli) -> None:
    r = cli("publish")
    assert r.returncode == EXIT["usage"]
    assert "required" in r.stderr


def _write_pki(dir: Path, leaf_key_path: Path, spiffe_id: str) -> tuple[Path, Path]:
    """A P-256 root and a leaf for the publisher's Ed25519 key: (root.pem, chain.pem)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from autoglm.protocol import parse_private_key

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Root")])
    ku = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
              encipher_only=False, decipher_only=False)
    root = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True, **ku), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pub = parse_private_key(leaf_key_path.read_bytes()).public_key()
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "publisher")]))
        .issuer_name(ca_name).public_key(pub).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **ku), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (dir / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    (dir / "chain.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return dir / "root.pem", dir / "chain.pem"


def test_x509_publisher_through_the_cli(cli: Cli, published: Published, tmp_path: Path) -> None:
    spiffe = "spiffe://example.org/publisher/x"
    root, chain = _write_pki(tmp_path, published.key, spiffe)
    out = tmp_path / "x509.agm"
    r = cli("publish", published.model, "--key", published.key, "--name", "x", "--version", "1", "--out", out,
            "--cert-chain", chain)
    assert r.returncode == 0, r.stderr
    assert len(_signed(out).chain) == 1
    node = tmp_path / "node"
    for allowed in (spiffe, "spiffe://example.org/publisher/"):
        r = cli("verify-manifest", out, "--root", root, "--spiffe-id", allowed, data_dir=node)
        assert r.returncode == EXIT["ok"], r.stderr
    r = cli("verify-manifest", out, "--root", root, "--spiffe-id", "spiffe://example.org/other", data_dir=node)
    assert r.returncode == EXIT["trust"]
    assert f"SPIFFE ID {spiffe} is not allowed" in r.stderr
    (tmp_path / "junk.pem").write_text("junk\n")
    r = cli("publish", published.model, "--key", published.key, "--name", "x", "--version", "1", "--out", out,
            "--cert-chain", tmp_path / "junk.pem")
    assert r.returncode == EXIT["usage"]
    assert "cannot read the certificate chain" in r.stderr


def test_command_table_names_every_command_and_its_module() -> None:
    """main() loads only the module of the command named (fetch handed to a node starts fast)."""
    import argparse

    from autoglm.node.cli._main import COMMANDS, _command_word, build_parser

    def commands(parser: argparse.ArgumentParser) -> set[str]:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return set(sub.choices)

    assert commands(build_parser()) == set(COMMANDS)
    for name in COMMANDS:
        assert name in commands(build_parser(name))
    assert _command_word(["--data-dir", "fetch", "-v", "status", "x"]) == "status"
    assert _command_word(["-v", "--help"]) is None
