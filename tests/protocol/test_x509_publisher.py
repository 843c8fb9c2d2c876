"""X.509 publisher identity: a chain to a configured root plus a SPIFFE ID policy.

The PKI is built here with `cryptography`: an ECDSA P-256 root and intermediate
(what an organisation's CA typically uses) and a leaf for the publisher's
Ed25519 signing key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.protocol import (
    AutoglmError,
    FileEntry,
    Manifest,
    Piece,
    SignedManifest,
    TrustError,
    TrustPolicy,
    decode_signed_manifest,
    key_id,
    sign_manifest,
    verify_manifest,
)
from autoglm.protocol._x509 import spiffe_id_allowed

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
SPIFFE = "spiffe://example.org/publisher/x"
H = hashlib.sha256(b"x").digest()

CaKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _sign(builder: x509.CertificateBuilder, key: CaKey) -> x509.Certificate:
    return builder.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(cn: str, key: CaKey, issuer: tuple[x509.Certificate, CaKey] | None = None) -> x509.Certificate:
    issuer_name = issuer[0].subject if issuer else _name(cn)
    issuer_key = issuer[1] if issuer else key
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - 365 * DAY)
        .not_valid_after(NOW + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    return _sign(b, issuer_key)


def make_leaf(
    issuer: tuple[x509.Certificate, CaKey],
    key: ed25519.Ed25519PrivateKey,
    *,
    uris: tuple[str, ...] = (SPIFFE,),
    eku: tuple[x509.ObjectIdentifier, ...] | None = (ExtendedKeyUsageOID.CODE_SIGNING,),
    not_before: dt.datetime = NOW - DAY,
    not_after: dt.datetime = NOW + 30 * DAY,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(_name("publisher"))
        .issuer_name(issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False)
    )
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return _sign(b, issuer[1])


def der(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


def pem(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


@dataclass
class Pki:
    root_key: CaKey
    root: x509.Certificate
    inter_key: CaKey
    inter: x509.Certificate
    leaf_key: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)

    def leaf(self, **kw: object) -> x509.Certificate:
        return make_leaf((self.inter, self.inter_key), self.leaf_key, **kw)  # type: ignore[arg-type]


def new_pki(kind: str = "ec") -> Pki:
    def gen() -> CaKey:
        return ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else ed25519.Ed25519PrivateKey.generate()

    rk, ik = gen(), gen()
    root = make_ca("Example Root CA", rk)
    inter = make_ca("Example Publishing CA", ik, (root, rk))
    return Pki(rk, root, ik, inter)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return new_pki()


@pytest.fixture(scope="module")
def good_envelope(pki: Pki) -> bytes:
    """One fixed signed envelope with a leaf + intermediate chain (certificates carry random serials)."""
    return signed_bytes(pki.leaf_key, (der(pki.leaf()), der(pki.inter)))


def signed_bytes(key: ed25519.Ed25519PrivateKey, chain: tuple[bytes, ...]) -> bytes:
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    m = Manifest("m", "1", 0, key_id(pub), (FileEntry("a", 1, H, (Piece(0, 1, H),)),))
    return sign_manifest(m, key, chain).encode()


def verify(
    data: bytes, roots: tuple[bytes, ...], spiffe_ids: tuple[str, ...] = (SPIFFE,), now: dt.datetime = NOW
) -> Manifest:
    """Decode the envelope from bytes, as a node would, then verify it."""
    return verify_manifest(decode_signed_manifest(data), TrustPolicy(roots=roots, spiffe_ids=spiffe_ids), now)


@pytest.mark.parametrize("policy", [(SPIFFE,), ("spiffe://example.org/publisher/",), ("spiffe://other/", SPIFFE)])
def test_good_chain_passes(pki: Pki, policy: tuple[str, ...]) -> None:
    data = signed_bytes(pki.leaf_key, (der(pki.leaf()), der(pki.inter)))
    assert verify(data, (pem(pki.root),), policy).name == "m"


@pytest.mark.parametrize("eku", [ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.CLIENT_AUTH])
def test_allowed_extended_key_usages(pki: Pki, eku: x509.ObjectIdentifier) -> None:
    data = signed_bytes(pki.leaf_key, (der(pki.leaf(eku=(eku,))), der(pki.inter)))
    verify(data, (der(pki.root),))


def test_server_auth_only_leaf_fails(pki: Pki) -> None:
    data = signed_bytes(pki.leaf_key, (der(pki.leaf(eku=(ExtendedKeyUsageOID.SERVER_AUTH,))), der(pki.inter)))
    with pytest.raises(TrustError, match="does not verify"):
        verify(data, (pem(pki.root),))


def test_intermediate_from_policy(pki: Pki) -> None:
    data = signed_bytes(pki.leaf_key, (der(pki.leaf()),))
    policy = TrustPolicy(roots=(pem(pki.root),), spiffe_ids=(SPIFFE,), intermediates=(pem(pki.inter),))
    verify_manifest(decode_signed_manifest(data), policy, NOW)
    with pytest.raises(TrustError, match="does not verify"):
        verify(data, (pem(pki.root),))


def test_expired_leaf_fails(pki: Pki) -> None:
    leaf = pki.leaf(not_before=NOW - 60 * DAY, not_after=NOW - DAY)
    data = signed_bytes(pki.leaf_key, (der(leaf), der(pki.inter)))
    with pytest.raises(TrustError, match="chain does not verify"):
        verify(data, (pem(pki.root),))


def test_time_is_a_parameter(pki: Pki) -> None:
    data = signed_bytes(pki.leaf_key, (der(pki.leaf()), der(pki.inter)))
    verify(data, (pem(pki.root),), now=NOW + 29 * DAY)
    for when in (NOW + 31 * DAY, NOW - 2 * DAY):
        with pytest.raises(TrustError, match="chain does not verify"):
            verify(data, (pem(pki.root),), now=when)


def test_wrong_root_fails(pki: Pki) -> None:
    other = new_pki()
    data = signed_bytes(pki.leaf_key, (der(pki.leaf()), der(pki.inter)))
    with pytest.raises(TrustError, match="chain does not verify"):
        verify(data, (pem(other.root),))


def test_root_sent_in_the_chain_is_not_a_trust_anchor(pki: Pki) -> None:
    """The chain's own root certificate, sent by the publisher, is not a trust anchor."""
    other = new_pki()
    data = signed_bytes(pki.leaf_key, (der(pki.leaf()), der(pki.inter), der(pki.root)))
    with pytest.raises(TrustError, match="chain does not verify"):
        verify(data, (pem(other.root),))


@pytest.mark.parametrize(
    "policy",
    [
        ("spiffe://example.org/publisher/y",),
        ("spiffe://example.org/publisher",),
        ("spiffe://example.org/publisher/x/",),
        ("spiffe://example.org/pub",),
        ("spiffe://other.org/",),
        (),
    ],
)
def test_wrong_spiffe_id_fails(pki: Pki, policy: tuple[str, ...]) -> None:
    data = signed_bytes(pki.leaf_key, (der(pki.leaf()), der(pki.inter)))
    with pytest.raises(TrustError, match=f"SPIFFE ID {SPIFFE} is not allowed"):
        verify(data, (pem(pki.root),), policy)


def test_lookalike_spiffe_id_fails(pki: Pki) -> None:
    leaf = pki.leaf(uris=("spiffe://example.org/publisher/x-evil",))
    data = signed_bytes(pki.leaf_key, (der(leaf), der(pki.inter)))
    with pytest.raises(TrustError, match="is not allowed"):
        verify(data, (pem(pki.root),))


@pytest.mark.parametrize(
    "uris", [(SPIFFE, "spiffe://example.org/publisher/y"), ("https://example.org/publisher/x",)]
)
def test_leaf_must_carry_exactly_one_spiffe_uri(pki: Pki, uris: tuple[str, ...]) -> None:
    data = signed_bytes(pki.leaf_key, (der(pki.leaf(uris=uris)), der(pki.inter)))
    with pytest.raises(TrustError, match="exactly one URI SAN"):
        verify(data, (pem(pki.root),), (SPIFFE, "spiffe://example.org/publisher/y", "https://example.org/"))


def test_leaf_for_a_different_key_fails(pki: Pki) -> None:
    other_key = ed25519.Ed25519PrivateKey.generate()
    data = signed_bytes(other_key, (der(pki.leaf()), der(pki.inter)))
    with pytest.raises(TrustError, match="not for the key that signed the manifest"):
        verify(data, (pem(pki.root),))


def test_chain_without_roots_configured_fails(pki: Pki) -> None:
    data = signed_bytes(pki.leaf_key, (der(pki.leaf()), der(pki.inter)))
    with pytest.raises(TrustError, match="no root CAs are configured"):
        verify(data, ())


def test_malformed_certificate_is_a_trust_error(pki: Pki) -> None:
    data = signed_bytes(pki.leaf_key, (b"not a certificate",))
    with pytest.raises(TrustError, match="malformed certificate"):
        verify(data, (pem(pki.root),))


def test_raw_key_trust_needs_no_chain_check(pki: Pki) -> None:
    data = signed_bytes(pki.leaf_key, (b"not a certificate",))
    raw = pki.leaf_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    verify_manifest(decode_signed_manifest(data), TrustPolicy(keys=frozenset({raw})), NOW)


def test_ed25519_certificate_authorities_are_refused_cleanly() -> None:
    """Known limitation: cryptography's WebPKI verifier forbids Ed25519 CA keys.

    The failure must still be a TrustError with the reason, not a crash. If a
    future version accepts them, this test says so and can be turned around.
    """
    pki = new_pki("ed25519")
    data = signed_bytes(pki.leaf_key, (der(pki.leaf()), der(pki.inter)))
    with pytest.raises(TrustError, match="Forbidden public key algorithm"):
        verify(data, (pem(pki.root),))


@pytest.mark.parametrize(
    ("spiffe_id", "allowed", "ok"),
    [
        (SPIFFE, (SPIFFE,), True),
        (SPIFFE, ("spiffe://example.org/",), True),
        (SPIFFE, ("spiffe://example.org",), False),
        (SPIFFE + "/sub", (SPIFFE,), False),
        (SPIFFE, (), False),
    ],
)
def test_spiffe_policy_rule(spiffe_id: str, allowed: tuple[str, ...], ok: bool) -> None:
    assert spiffe_id_allowed(spiffe_id, allowed) is ok


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_corrupted_certificates_are_trust_errors(pki: Pki, good_envelope: bytes, data: st.DataObject) -> None:
    """The chain is outside the signature: any bytes there end in TrustError, never a crash.

    Found by this test: cryptography parses lazily and raised UnsupportedAlgorithm,
    InvalidVersion or ValueError from inside verify_publisher_chain.
    """
    signed = decode_signed_manifest(good_envelope)
    which = data.draw(st.integers(0, 1))
    cert = bytearray(signed.chain[which])
    for _ in range(data.draw(st.integers(1, 3))):
        cert[data.draw(st.integers(0, len(cert) - 1))] = data.draw(st.integers(0, 255))
    chain = list(signed.chain)
    chain[which] = bytes(cert)
    tampered = SignedManifest(signed.manifest, signed.public_key, signed.signature, tuple(chain))
    try:
        verify_manifest(tampered, TrustPolicy(roots=(pem(pki.root),), spiffe_ids=(SPIFFE,)), NOW)
    except AutoglmError as exc:
        assert isinstance(exc, TrustError), exc



@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_every_byte_flip_of_an_x509_envelope(pki: Pki, good_envelope: bytes) -> None:
    """Each single-byte flip fails with an AutoglmError, or changes nothing that is checked.

    The chain sits outside the manifest signature. cryptography accepts a
    BIT STRING "unused bits" count of 1 in a certificate's outer signature
    when the last bit is 0, so that one flip can leave the same TBS and
    signature: the certificate means the same and still verifies.
    """
    policy = TrustPolicy(roots=(pem(pki.root),), spiffe_ids=(SPIFFE,))
    original = decode_signed_manifest(good_envelope)
    for pos in range(len(good_envelope)):
        for mask in (0x01, 0xFF):
            bad = bytearray(good_envelope)
            bad[pos] ^= mask
            try:
                signed = decode_signed_manifest(bytes(bad))
                verify_manifest(signed, policy, NOW)
            except AutoglmError:
                continue
            assert signed.manifest == original.manifest and signed.public_key == original.public_key
            for new, old in zip(signed.chain, original.chain, strict=True):
                a, b = x509.load_der_x509_certificate(new), x509.load_der_x509_certificate(old)
                assert (a.tbs_certificate_bytes, a.signature) == (b.tbs_certificate_bytes, b.signature), pos
