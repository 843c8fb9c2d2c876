"""HTTPS mirrors (a private CA via SSL_CERT_FILE) and work moving away from a slow mirror."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from autoglm.node._mirrors import MirrorConfig
from autoglm.node.api import FetchOptions, NodeConfig, open_node

from .conftest import Published
from .faultserver import FaultServer


def _cert(tmp: Path) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_path, cert_path, key_path


@pytest.fixture
async def tls_server(published: Published, tmp_path: Path) -> AsyncIterator[tuple[FaultServer, Path]]:
    ca, cert, key = _cert(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    srv = FaultServer(published.root)
    srv.ssl_context = ctx
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        yield srv, ca
        nursery.cancel_scope.cancel()


async def test_https_mirror(published: Published, tls_server: tuple[FaultServer, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv, ca = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    async with open_node(NodeConfig(tmp_path / "data")) as node:
        with trio.fail_after(60):
            await node.fetch(published.manifest_path, out=tmp_path / "out", trust=published.trust, mirrors=[srv.url],
                             options=FetchOptions(space_margin=0))
    published.assert_identical(tmp_path / "out")
    assert srv.url.startswith("https://")


async def test_untrusted_certificate_is_refused(published: Published, tls_server: tuple[FaultServer, Path], tmp_path: Path) -> None:
    from autoglm.node.errors import NoSourceError

    srv, _ = tls_server
    async with open_node(NodeConfig(tmp_path / "data", MirrorConfig(backoff_base=0.01, backoff_cap=0.05))) as node:
        with trio.fail_after(60), pytest.raises(NoSourceError, match="TLS certificate of .* refused"):
            await node.fetch(published.manifest_path, out=tmp_path / "out", trust=published.trust, mirrors=[srv.url],
                             options=FetchOptions(space_margin=0))


async def test_work_moves_away_from_a_slow_mirror(published: Published, server: FaultServer, server2: FaultServer, tmp_path: Path) -> None:
    server.delay = 0.3  # RTT far over the 200 ms threshold
    cfg = MirrorConfig(max_request_bytes=128 << 10)
    async with open_node(NodeConfig(tmp_path / "data", cfg)) as node:
        with trio.fail_after(60):
            await node.fetch(published.manifest_path, out=tmp_path / "out", trust=published.trust,
                             mirrors=[server.url, server2.url], options=FetchOptions(space_margin=0))
    published.assert_identical(tmp_path / "out")
    assert server2.stats.body_bytes > 2 * server.stats.body_bytes
