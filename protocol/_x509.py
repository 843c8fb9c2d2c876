"""Optional X.509 publisher identity with a SPIFFE ID policy.

An organisation that runs its own PKI issues the publisher a certificate for
its Ed25519 signing key with a SPIFFE ID (``spiffe://trust-domain/path``) as
the only URI SAN. Nodes configured with the organisation's root CAs then trust
manifests from any publisher whose SPIFFE ID the policy allows, without
distributing raw keys. Time is a parameter: the caller passes ``now``.
"""

from __future__ import annotations

import re
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from ._errors import TrustError
from ._signing import TrustPolicy

__all__ = ["load_certificates", "spiffe_id_allowed", "spiffe_trust_domain", "verify_publisher_chain"]

# SPIFFE ID syntax (spiffe/standards SPIFFE-ID.md): lowercase trust domain, path
# segments of [A-Za-z0-9._-] that are not "." or "..", no query or fragment.
_SPIFFE_ID = re.compile(r"spiffe://([a-z0-9._-]{1,255})((?:/[A-Za-z0-9._-]+)*)")
_MAX_SPIFFE_ID = 2048

_ALLOWED_EKU = {ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.CLIENT_AUTH}
# The chain comes from the envelope, outside the signature: any bytes at all.
# cryptography parses certificates lazily, so these can surface at any access.
_PARSE_ERRORS = (ValueError, UnsupportedAlgorithm, x509.InvalidVersion)


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Parse one DER certificate or any number of PEM certificates."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except _PARSE_ERRORS as exc:
        raise TrustError(f"malformed certificate: {exc}") from exc


def spiffe_id_allowed(spiffe_id: str, allowed: tuple[str, ...]) -> bool:
    """Exact match, or prefix match for policy entries ending in ``/``."""
    return any(spiffe_id == a or (a.endswith("/") and spiffe_id.startswith(a)) for a in allowed)


def spiffe_trust_domain(spiffe_id: str) -> str:
    """The trust domain of a well-formed SPIFFE ID; TrustError for anything else."""
    m = _SPIFFE_ID.fullmatch(spiffe_id) if len(spiffe_id) <= _MAX_SPIFFE_ID else None
    if m is None or any(seg in (".", "..") for seg in m.group(2).split("/")):
        raise TrustError(f"{spiffe_id!r} is not a valid SPIFFE ID")
    return m.group(1)


def _policy_domain(entry: str) -> str | None:
    """The trust domain a policy entry (an ID or a prefix ending in /) names, if any."""
    m = re.match(r"spiffe://([a-z0-9._-]+)(?:/|$)", entry)
    return m.group(1) if m else None


def _root_domains(policy: TrustPolicy, roots: list[x509.Certificate]) -> dict[bytes, set[str]]:
    """Root certificate (DER) -> the trust domains it may vouch for."""
    bound: dict[bytes, set[str]] = {}
    for data, domains in policy.root_domains:
        for c in load_certificates(data):
            bound.setdefault(c.public_bytes(serialization.Encoding.DER), set()).update(d.lower() for d in domains)
    for c in roots:
        own = bound.setdefault(c.public_bytes(serialization.Encoding.DER), set())
        try:
            san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            continue
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if (d := _policy_domain(uri)) is not None:
                own.add(d)
    if len(roots) == 1:
        # One root: nobody else's CA is configured to be confused with it.
        bound[roots[0].public_bytes(serialization.Encoding.DER)].update(
            d for e in policy.spiffe_ids if (d := _policy_domain(e)) is not None
        )
    return bound


def _check_eku(_policy: object, _cert: x509.Certificate, ext: x509.ExtendedKeyUsage | None) -> None:
    if ext is not None and not (_ALLOWED_EKU & set(ext)):
        raise ValueError("extended key usage allows neither codeSigning nor clientAuth")


def _leaf_spiffe_id(leaf: x509.Certificate) -> str:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise TrustError("publisher certificate has no subject alternative name") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    if len(uris) != 1 or len(spiffe) != 1:
        raise TrustError("publisher certificate must carry exactly one URI SAN, a SPIFFE ID")
    return spiffe[0]


def verify_publisher_chain(chain: tuple[bytes, ...], public_key: bytes, policy: TrustPolicy, now: datetime) -> str:
    """Verify ``chain`` (DER, leaf first) to a policy root at ``now``; return the SPIFFE ID.

    The leaf must certify exactly ``public_key``, the key that signed the
    manifest. Raises TrustError with the reason otherwise.
    """
    try:
        return _verify_chain(chain, public_key, policy, now)
    except _PARSE_ERRORS as exc:
        raise TrustError(f"malformed certificate: {exc}") from exc


def _verify_chain(chain: tuple[bytes, ...], public_key: bytes, policy: TrustPolicy, now: datetime) -> str:
    if not chain:
        raise TrustError("no certificate chain")
    # One DER certificate per entry: a PEM entry could pack dozens of
    # certificates into the chain-building search from 16 KiB.
    if any(b"-----BEGIN" in der for der in chain):
        raise TrustError("certificate chain entries must be DER, one certificate each")
    certs = [c for der in chain for c in load_certificates(der)]
    leaf = certs[0]
    leaf_key = leaf.public_key()
    if not isinstance(leaf_key, Ed25519PublicKey) or leaf_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    ) != public_key:
        raise TrustError("publisher certificate is not for the key that signed the manifest")
    roots = [c for r in policy.roots for c in load_certificates(r)]
    extra = [c for i in policy.intermediates for c in load_certificates(i)]
    try:
        _verifier(roots, now).verify(leaf, certs[1:] + extra)
    except VerificationError as exc:
        raise TrustError(f"publisher certificate chain does not verify: {exc}") from exc
    spiffe_id = _leaf_spiffe_id(leaf)
    domain = spiffe_trust_domain(spiffe_id)
    if not spiffe_id_allowed(spiffe_id, policy.spiffe_ids):
        raise TrustError(f"SPIFFE ID {spiffe_id} is not allowed by the trust policy")
    # The chain reached some configured root; it must reach one bound to this trust domain.
    bound = _root_domains(policy, roots)
    anchors = [c for c in roots if domain in bound[c.public_bytes(serialization.Encoding.DER)]]
    if not anchors:
        raise TrustError(f"no configured root CA is bound to trust domain {domain} (of {spiffe_id})")
    try:
        _verifier(anchors, now).verify(leaf, certs[1:] + extra)
    except VerificationError as exc:
        raise TrustError(
            f"SPIFFE ID {spiffe_id} was issued under a root CA not bound to trust domain {domain}"
        ) from exc
    return spiffe_id


def _verifier(roots: list[x509.Certificate], now: datetime) -> ClientVerifier:
    ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _check_eku
    )
    return (
        PolicyBuilder()
        .store(Store(roots))
        .time(now)
        .max_chain_depth(4)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
        .build_client_verifier()
    )
