"""Publisher key files and the trust store on disk."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from autoglm.protocol import (
    ConfigError,
    LocalProtocolError,
    TrustPolicy,
    encode_public_key,
    generate_private_key,
    key_id,
    parse_private_key,
    parse_public_key,
)

from ._config import trust_dir

__all__ = ["load_private_key", "load_public_key", "load_trust_policy", "write_keypair"]


def write_keypair(path: Path, *, force: bool = False) -> str:
    """Write a new Ed25519 private key (mode 0600) and PATH.pub; return the key id."""
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; pass --force to overwrite it")
    key = generate_private_key()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(encode_public_key(key))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key_id(raw)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read(path, "private key")
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"private key {path} is readable by other users; run: chmod 600 {path}")
    try:
        return parse_private_key(data)
    except LocalProtocolError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_public_key(path: Path) -> bytes:
    try:
        return parse_public_key(_read(path, "public key"))
    except LocalProtocolError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_trust_policy(
    data_dir: Path | None,
    keys: Iterable[Path] = (),
    roots: Iterable[Path] = (),
    spiffe_ids: Iterable[str] = (),
) -> TrustPolicy:
    """Keys and roots from flags plus DATA_DIR/trust/*.pub and DATA_DIR/trust/roots/*.pem.

    DATA_DIR/trust/spiffe-ids (one per line) adds allowed SPIFFE IDs.
    DATA_DIR/trust/roots/<trust domain>/*.pem are roots bound to that SPIFFE
    trust domain: with several roots, a root vouches only for its own domains.
    """
    key_paths = list(keys)
    root_paths = list(roots)
    ids = list(spiffe_ids)
    bound: list[tuple[bytes, tuple[str, ...]]] = []
    if data_dir is not None:
        td = trust_dir(data_dir)
        key_paths += sorted(td.glob("*.pub"))
        root_paths += sorted((td / "roots").glob("*.pem"))
        for domain_dir in sorted(p for p in (td / "roots").glob("*") if p.is_dir()):
            for p in sorted(domain_dir.glob("*.pem")):
                data = _read(p, "root CA")
                root_paths.append(p)
                bound.append((data, (domain_dir.name,)))
        ids_file = td / "spiffe-ids"
        if ids_file.is_file():
            ids += [ln.strip() for ln in ids_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return TrustPolicy(
        keys=frozenset(load_public_key(p) for p in key_paths),
        roots=tuple(_read(p, "root CA") for p in root_paths),
        spiffe_ids=tuple(ids),
        root_domains=tuple(bound),
    )
