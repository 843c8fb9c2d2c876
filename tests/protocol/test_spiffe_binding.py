"""A root CA vouches only for its own SPIFFE trust domains.

Two organisations' PKIs, generated here with `cryptography`: before, with both
roots configured, either root could issue a leaf carrying the other's SPIFFE
ID and the node trusted it.
"""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from test_x509_publisher import NOW, Pki, der, make_ca, new_pki, pem, signed_bytes

from autoglm.protocol import TrustError, TrustPolicy, decode_signed_manifest, verify_manifest
from autoglm.protocol._x509 import spiffe_trust_domain

A_ID = "spiffe://a.example/publisher/x"
B_ID = "spiffe://b.example/publisher/x"
BOTH = (A_ID, B_ID)


@pytest.fixture(scope="module")
def org_a() -> Pki:
    return new_pki()


@pytest.fixture(scope="module")
def org_b() -> Pki:
    return new_pki()


def _envelope(pki: Pki, spiffe_id: str) -> bytes:
    return signed_bytes(pki.leaf_key, (der(pki.leaf(uris=(spiffe_id,))), der(pki.inter)))


def _verify(data: bytes, policy: TrustPolicy) -> None:
    verify_manifest(decode_signed_manifest(data), policy, NOW)


def _bound(a: Pki, b: Pki) -> TrustPolicy:
    return TrustPolicy(roots=(pem(a.root), pem(b.root)), spiffe_ids=BOTH,
                       root_domains=((pem(a.root), ("a.example",)), (pem(b.root), ("b.example",))))


def test_each_root_issues_its_own_domain(org_a: Pki, org_b: Pki) -> None:
    _verify(_envelope(org_a, A_ID), _bound(org_a, org_b))
    _verify(_envelope(org_b, B_ID), _bound(org_a, org_b))


@pytest.mark.parametrize("issuer", ["a", "b"])
def test_root_cannot_issue_another_organisations_spiffe_id(org_a: Pki, org_b: Pki, issuer: str) -> None:
    pki, stolen = (org_a, B_ID) if issuer == "a" else (org_b, A_ID)
    with pytest.raises(TrustError, match="not bound to trust domain"):
        _verify(_envelope(pki, stolen), _bound(org_a, org_b))


def test_unbound_roots_vouch_for_nothing_when_there_are_several(org_a: Pki, org_b: Pki) -> None:
    policy = TrustPolicy(roots=(pem(org_a.root), pem(org_b.root)), spiffe_ids=BOTH)
    for data in (_envelope(org_a, A_ID), _envelope(org_a, B_ID)):
        with pytest.raises(TrustError, match="no configured root CA is bound"):
            _verify(data, policy)


def test_a_single_root_is_bound_to_the_policy_domains(org_a: Pki) -> None:
    _verify(_envelope(org_a, A_ID), TrustPolicy(roots=(pem(org_a.root),), spiffe_ids=(A_ID,)))


def _root_with_spiffe_san(domain: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    plain = make_ca(f"{domain} root", key)
    b = x509.CertificateBuilder(
        issuer_name=plain.issuer, subject_name=plain.subject, public_key=key.public_key(),
        serial_number=x509.random_serial_number(), not_valid_before=plain.not_valid_before_utc,
        not_valid_after=plain.not_valid_after_utc, extensions=list(plain.extensions),
    ).add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{domain}")]), critical=False)
    from cryptography.hazmat.primitives import hashes

    return b.sign(key, hashes.SHA256()), key


def test_root_binds_itself_with_its_own_spiffe_san(org_b: Pki) -> None:
    root, rk = _root_with_spiffe_san("a.example")
    ik = ec.generate_private_key(ec.SECP256R1())
    a = Pki(rk, root, ik, make_ca("a.example issuing", ik, (root, rk)))
    policy = TrustPolicy(roots=(pem(root), pem(org_b.root)), spiffe_ids=BOTH,
                         root_domains=((pem(org_b.root), ("b.example",)),))
    _verify(_envelope(a, A_ID), policy)
    with pytest.raises(TrustError, match="not bound"):
        _verify(_envelope(a, B_ID), policy)


@pytest.mark.parametrize("spiffe_id", [
    "spiffe://A.example/publisher/x",  # trust domains are lowercase
    "spiffe://a.example/publisher/../admin",
    "spiffe://a.example/publisher/./x",
    "spiffe://a.example//x",
    "spiffe://a.example/x?q=1",
    "spiffe://a.example/x#f",
    "spiffe://user@a.example/x",
    "spiffe://a.example:443/x",
    "spiffe://a.example/x/",
    "spiffe:///x",
    "SPIFFE://a.example/x",
])
def test_malformed_spiffe_ids_are_refused(org_a: Pki, spiffe_id: str) -> None:
    with pytest.raises(TrustError):
        spiffe_trust_domain(spiffe_id)
    policy = TrustPolicy(roots=(pem(org_a.root),), spiffe_ids=("spiffe://a.example/",))
    with pytest.raises(TrustError):
        _verify(_envelope(org_a, spiffe_id), policy)


def test_chain_entries_are_one_der_certificate_each(org_a: Pki) -> None:
    """A PEM entry would let 16 KiB carry dozens of certificates into chain building."""
    extra = b"".join(pem(new_pki().inter) for _ in range(6))
    data = signed_bytes(org_a.leaf_key, (der(org_a.leaf(uris=(A_ID,))), pem(org_a.inter) + extra))
    with pytest.raises(TrustError, match="DER"):
        _verify(data, TrustPolicy(roots=(pem(org_a.root),), spiffe_ids=(A_ID,)))
