"""autoglm-node trust add|list|remove, and verify/fetch using the trust store (real CLI processes)."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from autoglm.node import open_model

from .conftest import Served, cli

EXIT_TRUST = 4
EXIT_USAGE = 2


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("AUTOGLM_NODE_HOME", "AUTOGLM_TRUST")}
    e["AUTOGLM_DATA_DIR"] = str(tmp_path / "data")
    return e


def ca_pem(path: Path, cn: str = "test root") -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_verify_by_name_after_fetch_needs_no_trust_flag_once_the_key_is_stored(served: Served, tmp_path: Path, env: dict[str, str]) -> None:
    r = cli("fetch", served.manifest_url, "--mirror", served.url, "--out", tmp_path / "out", "--trust", served.pub, "--standalone", env=env)
    assert r.returncode == 0, r.stderr
    r = cli("verify", "org/tiny", "--no-fit", env=env)
    assert r.returncode == EXIT_TRUST and "autoglm-node trust add" in r.stderr, r.stdout + r.stderr

    r = cli("trust", "add", served.pub, "--json", env=env)
    assert r.returncode == 0, r.stderr
    [added] = json.loads(r.stdout)["added"]
    assert added["kind"] == "key"
    kid = added["id"]

    r = cli("verify", "org/tiny", "--no-fit", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True and out["signer"] == kid
    assert out["trusted_by"].startswith("the trust store") and f"{kid}.pub" in out["trusted_by"]
    r = cli("verify", "org/tiny", "--no-fit", env=env)
    assert "trusted by the trust store" in " ".join(r.stdout.split())

    r = cli("verify", "org/tiny", "--no-fit", "--json", "--trust", served.pub, env=env)
    assert json.loads(r.stdout)["trusted_by"] == f"--trust {served.pub}"  # the flag is named first

    # The Python API reads the same store when trust is not given.
    os.environ["AUTOGLM_DATA_DIR"], old = env["AUTOGLM_DATA_DIR"], os.environ.get("AUTOGLM_DATA_DIR")
    try:
        assert open_model("org/tiny").manifest is not None
    finally:
        if old is None:
            del os.environ["AUTOGLM_DATA_DIR"]
        else:
            os.environ["AUTOGLM_DATA_DIR"] = old

    r = cli("trust", "remove", served.pub, env=env)
    assert r.returncode == 0 and kid in r.stdout
    assert cli("verify", "org/tiny", "--no-fit", env=env).returncode == EXIT_TRUST


def test_list_add_remove_keys_roots_and_spiffe_ids(served: Served, tmp_path: Path, env: dict[str, str]) -> None:
    assert "is empty" in " ".join(cli("trust", "list", env=env).stdout.split())
    ca = ca_pem(tmp_path / "ca.pem")
    # A private key file: only its public half is stored.
    r = cli("trust", "add", served.work / "publisher", "--root", ca, "--spiffe-id", "spiffe://example.org/models/", env=env)
    assert r.returncode == 0, r.stderr
    stored = list((Path(env["AUTOGLM_DATA_DIR"]) / "trust").glob("*.pub"))
    assert len(stored) == 1 and b"PRIVATE" not in stored[0].read_bytes()
    listed = json.loads(cli("trust", "list", "--json", env=env).stdout)["entries"]
    assert sorted(e["kind"] for e in listed) == ["key", "root", "spiffe-id"]
    root = next(e for e in listed if e["kind"] == "root")
    assert "CN=test root" in root["detail"]
    # Adding again changes nothing.
    cli("trust", "add", served.pub, "--spiffe-id", "spiffe://example.org/models/", env=env)
    assert len(json.loads(cli("trust", "list", "--json", env=env).stdout)["entries"]) == 3

    r = cli("trust", "remove", root["id"], "spiffe://example.org/models/", env=env)
    assert r.returncode == 0, r.stderr
    assert [e["kind"] for e in json.loads(cli("trust", "list", "--json", env=env).stdout)["entries"]] == ["key"]
    key_id = json.loads(cli("trust", "list", "--json", env=env).stdout)["entries"][0]["id"]
    assert cli("trust", "remove", key_id[:10], env=env).returncode == 0  # a key id prefix names it
    assert "is empty" in " ".join(cli("trust", "list", env=env).stdout.split())


def test_bad_input_is_refused_and_nothing_is_stored(served: Served, tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "junk.pub").write_text("not a key")
    for args in (("trust", "add"), ("trust", "add", tmp_path / "junk.pub"), ("trust", "add", served.pub, "--spiffe-id", "example.org/x"),
                 ("trust", "add", served.pub, "--root", tmp_path / "junk.pub"), ("trust", "remove", "deadbeefdeadbeef")):
        r = cli(*args, env=env)
        assert r.returncode == EXIT_USAGE, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error:"), r.stderr
    assert not list((Path(env["AUTOGLM_DATA_DIR"]) / "trust").glob("**/*.p*"))
