"""Signed manifest envelopes, Ed25519 publisher keys and the trust decision.

The envelope is what lives on disk and on mirrors::

    MAGIC (8 bytes) || canonical msgpack {chain, manifest, pubkey, sig, v}

``sig`` is Ed25519 over ``DOMAIN || manifest`` where ``manifest`` is the
canonical manifest bytes. The domain tag keeps a manifest signature from ever
being valid as a signature over some other autoglm structure (name records use
their own tag). Verification raises; it never returns a bool.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._codec import Limits, decode_canonical, encode_canonical
from ._errors import LocalProtocolError, RemoteProtocolError, SignatureError, TrustError
from ._manifest import Manifest, ManifestLimits, decode_manifest

__all__ = [
    "DOMAIN_MANIFEST",
    "MAGIC",
    "SignedManifest",
    "TrustPolicy",
    "decode_signed_manifest",
    "encode_public_key",
    "generate_private_key",
    "key_id",
    "parse_private_key",
    "parse_public_key",
    "sign_manifest",
    "verify_manifest",
    "verify_signature",
]

MAGIC = b"\x89AGM\r\n\x1a\n"
DOMAIN_MANIFEST = b"autoglm-node/manifest/v1\x00"
_ENVELOPE_VERSION = 1
_MAX_CHAIN = 8
_MAX_CERT = 16 * 1024


def key_id(public_key: bytes) -> str:
    """A short, stable id for a raw 32-byte Ed25519 public key (32 hex chars)."""
    if len(public_key) != 32:
        raise LocalProtocolError("an Ed25519 public key is 32 bytes")
    return hashlib.sha256(b"autoglm-node/key/v1\x00" + public_key).hexdigest()[:32]


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def encode_public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """PEM SubjectPublicKeyInfo, readable by openssl and by :func:`parse_public_key`."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def parse_public_key(data: bytes) -> bytes:
    """Return the raw 32-byte key from a PEM public key, a private key, or 64 hex chars."""
    text = data.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    try:
        pub = serialization.load_pem_public_key(text)
    except ValueError:
        try:
            return _raw_public(parse_private_key(data).public_key())
        except LocalProtocolError:
            raise LocalProtocolError("not an Ed25519 public key (PEM or 64 hex characters)") from None
    if not isinstance(pub, Ed25519PublicKey):
        raise LocalProtocolError("the public key is not Ed25519")
    return _raw_public(pub)


def parse_private_key(data: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise LocalProtocolError(f"not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise LocalProtocolError("the private key is not Ed25519")
    return key


def verify_signature(public_key: bytes, signature: bytes, domain: bytes, message: bytes) -> None:
    """Raise SignatureError unless ``signature`` is valid for ``domain || message``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, domain + message)
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError("signature does not verify") from exc


@dataclass(frozen=True, slots=True)
class SignedManifest:
    """A decoded envelope. Its signature is *not* checked until :func:`verify_manifest`."""

    manifest: Manifest
    public_key: bytes
    signature: bytes
    chain: tuple[bytes, ...] = ()

    @property
    def id(self) -> bytes:
        return self.manifest.id

    @property
    def signer(self) -> str:
        return key_id(self.public_key)

    def encode(self) -> bytes:
        return MAGIC + encode_canonical(
            {
                "v": _ENVELOPE_VERSION,
                "manifest": self.manifest.encode(),
                "pubkey": self.public_key,
                "sig": self.signature,
                "chain": list(self.chain),
            }
        )


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey, chain: tuple[bytes, ...] = ()) -> SignedManifest:
    """Sign ``manifest``; its ``publisher`` must be the key id of ``key``."""
    pub = _raw_public(key.public_key())
    if manifest.publisher != key_id(pub):
        raise LocalProtocolError("manifest.publisher is not the key id of the signing key")
    sig = key.sign(DOMAIN_MANIFEST + manifest.encode())
    return SignedManifest(manifest, pub, sig, tuple(chain))


def decode_signed_manifest(data: bytes, limits: ManifestLimits = ManifestLimits()) -> SignedManifest:
    """Parse an envelope and its manifest. Raises RemoteProtocolError only."""
    if not data.startswith(MAGIC):
        hint = " (it looks like HTML)" if data.lstrip()[:1] == b"<" else ""
        raise RemoteProtocolError(f"not an autoglm signed manifest: bad magic bytes{hint}")
    env = decode_canonical(
        data[len(MAGIC) :],
        Limits(max_bytes=limits.max_bytes + 256 * 1024, max_bin_len=limits.max_bytes, max_array_len=_MAX_CHAIN, max_map_len=8),
    )
    if not isinstance(env, dict) or set(env) != {"v", "manifest", "pubkey", "sig", "chain"}:
        raise RemoteProtocolError("invalid signed manifest: unexpected or missing fields")
    if env["v"] != _ENVELOPE_VERSION or isinstance(env["v"], bool):
        raise RemoteProtocolError(f"unsupported envelope version {env['v']!r}")
    pub, sig, chain, body = env["pubkey"], env["sig"], env["chain"], env["manifest"]
    if not isinstance(pub, bytes) or len(pub) != 32:
        raise RemoteProtocolError("invalid signed manifest: public key is not 32 bytes")
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise RemoteProtocolError("invalid signed manifest: signature is not 64 bytes")
    if not isinstance(body, bytes):
        raise RemoteProtocolError("invalid signed manifest: manifest is not bytes")
    if not isinstance(chain, list) or not all(isinstance(c, bytes) and 0 < len(c) <= _MAX_CERT for c in chain):
        raise RemoteProtocolError("invalid signed manifest: malformed certificate chain")
    return SignedManifest(decode_manifest(body, limits), pub, sig, tuple(chain))


@dataclass(frozen=True, slots=True)
class TrustPolicy:
    """Who may sign manifests: raw Ed25519 keys, and/or an X.509 PKI with a SPIFFE policy.

    ``spiffe_ids`` holds allowed SPIFFE IDs; an entry ending in ``/`` allows
    every ID under that path. With roots but no ``spiffe_ids``, any SPIFFE ID
    in a configured trust domain is refused: an explicit policy is required.

    A root CA vouches only for its own trust domains (docs/security.md): those
    given for it in ``root_domains`` (pairs of root certificate bytes and
    trust domain names), those in the root certificate's own SPIFFE URI SANs,
    and, when it is the only root configured, the trust domains of
    ``spiffe_ids``. So one organisation's CA cannot issue another's SPIFFE ID.
    """

    keys: frozenset[bytes] = frozenset()
    roots: tuple[bytes, ...] = ()
    spiffe_ids: tuple[str, ...] = ()
    intermediates: tuple[bytes, ...] = field(default=())
    root_domains: tuple[tuple[bytes, tuple[str, ...]], ...] = field(default=())


def verify_manifest(signed: SignedManifest, policy: TrustPolicy, now: datetime) -> Manifest:
    """Check the signature and that the signer is trusted; return the manifest.

    Raises SignatureError if the signature is bad and TrustError if the
    signer is not trusted by ``policy`` at time ``now``.
    """
    m = signed.manifest
    if m.publisher != key_id(signed.public_key):
        raise SignatureError("manifest publisher id does not match the signing key")
    verify_signature(signed.public_key, signed.signature, DOMAIN_MANIFEST, m.encode())
    if signed.public_key in policy.keys:
        return m
    if not signed.chain:
        if not policy.keys and not policy.roots:
            raise TrustError("no trusted publisher keys are configured; pass --trust KEY.pub")
        raise TrustError(f"publisher key {signed.signer} is not trusted")
    if not policy.roots:
        raise TrustError(
            f"publisher key {signed.signer} is not trusted and no root CAs are configured for its certificate chain"
        )
    from ._x509 import verify_publisher_chain

    verify_publisher_chain(signed.chain, signed.public_key, policy, now)
    return m
