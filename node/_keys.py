"""Publisher key files and the trust store on disk."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

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

__all__ = [
    "KeySource",
    "TrustEntry",
    "TrustLike",
    "add_to_trust_store",
    "as_trust_policy",
    "list_trust_store",
    "remove_from_trust_store",
    "trust_origins",
    "load_private_key",
    "load_public_key",
    "load_trust_policy",
    "trust_policy",
    "write_keypair",
]

#: A public key: a key file's path, or the key itself (PEM bytes, 64 hex characters, or 32 raw bytes).
KeySource: TypeAlias = str | os.PathLike[str] | bytes
#: What the Python API accepts as ``trust``: a policy, one key, or several keys.
TrustLike: TypeAlias = TrustPolicy | KeySource | Iterable[KeySource]


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


def _key(source: KeySource) -> bytes:
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
        if len(data) == 32 and not data.lstrip().startswith(b"-----"):
            return data  # a raw Ed25519 public key
        try:
            return parse_public_key(data)
        except LocalProtocolError as exc:
            raise ConfigError(f"trusted key: {exc}") from exc
    if isinstance(source, str | os.PathLike):
        return load_public_key(Path(source).expanduser())
    raise ConfigError(f"a trusted key is a key file path or key bytes, not {type(source).__name__}")


def _root(source: str | os.PathLike[str] | bytes) -> bytes:
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        return _read(Path(source).expanduser(), "root CA")
    raise ConfigError(f"a root CA is a PEM file path or PEM bytes, not {type(source).__name__}")


def _many(value: object) -> list[object]:
    if isinstance(value, str | bytes | bytearray | os.PathLike):
        return [value]
    if isinstance(value, Iterable):
        return list(value)
    return [value]


def trust_policy(
    keys: KeySource | Iterable[KeySource] = (),
    roots: str | os.PathLike[str] | bytes | Iterable[str | os.PathLike[str] | bytes] = (),
    spiffe_ids: str | Iterable[str] = (),
) -> TrustPolicy:
    """A :class:`TrustPolicy` from publisher keys and/or X.509 roots with allowed SPIFFE IDs.

    ``keys``: key file paths (``str`` or path-like) or key bytes (PEM, 64 hex
    characters, 32 raw bytes); one or several. ``roots``: root CA PEM files or
    PEM bytes. ``spiffe_ids``: allowed publisher SPIFFE IDs (a trailing ``/``
    allows a prefix). Raises ConfigError for an unreadable or malformed key.
    """
    ids = [spiffe_ids] if isinstance(spiffe_ids, str) else list(spiffe_ids)
    return TrustPolicy(
        keys=frozenset(_key(k) for k in _many(keys)),  # type: ignore[arg-type]
        roots=tuple(_root(r) for r in _many(roots)),  # type: ignore[arg-type]
        spiffe_ids=tuple(str(i) for i in ids),
    )


def as_trust_policy(trust: TrustLike | None, data_dir: Path) -> tuple[TrustPolicy, str]:
    """The policy ``trust`` stands for, and where it came from (for messages).

    None: the data directory's trust store (``autoglm-node trust add``);
    ConfigError when that is empty, with what to do about it.
    """
    if isinstance(trust, TrustPolicy):
        return trust, "the given trust policy"
    if trust is not None:
        return trust_policy(keys=trust), "the given keys"
    policy = load_trust_policy(data_dir)
    if not policy.keys and not policy.roots:
        raise ConfigError(
            f"no trusted publisher: pass trust=KEY.pub (a key file, key bytes or trust_policy(...)), "
            f"or add the key to the trust store with `autoglm-node trust add KEY.pub` ({trust_dir(data_dir)})"
        )
    return policy, f"the trust store {trust_dir(data_dir)}"


# -- the trust store: DATA_DIR/trust/ -------------------------------------------------
# <key id>.pub (public keys, PEM), roots/<fingerprint>.pem (root CAs), spiffe-ids
# (one per line). `autoglm-node trust add|list|remove` edits it; every command
# that checks manifests, and the Python API with trust=None, reads it.


@dataclass(frozen=True, slots=True)
class TrustEntry:
    """One thing the trust store trusts: a publisher key, a root CA, or a SPIFFE ID."""

    kind: str  # "key", "root" or "spiffe-id"
    id: str  # key id, certificate fingerprint (SHA-256 hex, 32 chars), or the SPIFFE ID
    detail: str  # the file that holds it, and for a root its subject
    path: Path | None


def _public_pem(raw: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _root_cert(data: bytes, where: str) -> tuple[str, str]:
    """(fingerprint, subject) of the first certificate in PEM ``data``; ConfigError if there is none."""
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{where} is not a PEM certificate: {exc}") from exc
    der = certs[0].public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()[:32], certs[0].subject.rfc4514_string()


def _write_new(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_ids(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def add_to_trust_store(
    data_dir: Path, keys: Iterable[Path] = (), roots: Iterable[Path] = (), spiffe_ids: Iterable[str] = ()
) -> list[TrustEntry]:
    """Store publisher keys (only their public half), root CAs and SPIFFE IDs; returns what was added.

    Everything is read and checked before anything is written.
    """
    td = trust_dir(data_dir)
    staged: list[tuple[TrustEntry, bytes | None]] = []
    for k in keys:
        raw = load_public_key(k)
        kid = key_id(raw)
        dest = td / f"{kid}.pub"
        staged.append((TrustEntry("key", kid, str(dest), dest), _public_pem(raw)))
    for r in roots:
        data = _read(r, "root CA")
        fp, subject = _root_cert(data, str(r))
        dest = td / "roots" / f"{fp}.pem"
        staged.append((TrustEntry("root", fp, f"{subject} ({dest})", dest), data))
    have = _read_ids(td / "spiffe-ids")
    new_ids = []
    for i in spiffe_ids:
        if not i.startswith("spiffe://"):
            raise ConfigError(f"{i!r} is not a SPIFFE ID (spiffe://trust-domain/path)")
        if i not in have and i not in new_ids:
            new_ids.append(i)
            staged.append((TrustEntry("spiffe-id", i, str(td / "spiffe-ids"), td / "spiffe-ids"), None))
    for entry, blob in staged:
        if blob is not None and entry.path is not None:
            _write_new(entry.path, blob)
    if new_ids:
        _write_new(td / "spiffe-ids", "".join(f"{i}\n" for i in [*have, *new_ids]).encode())
    return [e for e, _ in staged]


def list_trust_store(data_dir: Path) -> list[TrustEntry]:
    """Every key, root CA and SPIFFE ID the trust store holds (unreadable files raise ConfigError)."""
    td = trust_dir(data_dir)
    out = []
    for p in sorted(td.glob("*.pub")):
        out.append(TrustEntry("key", key_id(load_public_key(p)), str(p), p))
    for p in sorted((td / "roots").glob("*.pem")):
        fp, subject = _root_cert(_read(p, "root CA"), str(p))
        out.append(TrustEntry("root", fp, f"{subject} ({p})", p))
    out += [TrustEntry("spiffe-id", i, str(td / "spiffe-ids"), td / "spiffe-ids") for i in _read_ids(td / "spiffe-ids")]
    return out


def remove_from_trust_store(data_dir: Path, what: Iterable[str]) -> list[TrustEntry]:
    """Remove entries named by key id, certificate fingerprint, SPIFFE ID, or the key/certificate file
    itself; ConfigError for a name that matches nothing (nothing is removed then)."""
    entries = list_trust_store(data_dir)
    chosen: list[TrustEntry] = []
    for name in what:
        ident = name
        p = Path(name).expanduser()
        if p.is_file():
            data = _read(p, "file")
            try:
                ident = _root_cert(data, name)[0] if b"CERTIFICATE" in data else key_id(load_public_key(p))
            except ConfigError:
                ident = name
        match = [e for e in entries if ident in (e.id, str(e.path)) or (e.kind == "key" and len(ident) >= 8 and e.id.startswith(ident))]
        if not match:
            raise ConfigError(f"{name} is not in the trust store ({trust_dir(data_dir)}); see `autoglm-node trust list`")
        chosen += [e for e in match if e not in chosen]
    ids = [e.id for e in chosen if e.kind == "spiffe-id"]
    for e in chosen:
        if e.kind != "spiffe-id" and e.path is not None:
            e.path.unlink(missing_ok=True)
    if ids:
        td = trust_dir(data_dir)
        keep = [i for i in _read_ids(td / "spiffe-ids") if i not in ids]
        _write_new(td / "spiffe-ids", "".join(f"{i}\n" for i in keep).encode())
    return chosen


def trust_origins(data_dir: Path | None, keys: Iterable[Path] = (), roots: Iterable[Path] = ()) -> dict[bytes, str]:
    """Where each trusted key and root came from: raw key or root PEM bytes -> a phrase for messages."""
    out: dict[bytes, str] = {}
    for k in keys:
        out.setdefault(load_public_key(k), f"--trust {k}")
    for r in roots:
        out.setdefault(_read(r, "root CA"), f"--root {r}")
    if data_dir is not None:
        td = trust_dir(data_dir)
        for p in sorted(td.glob("*.pub")):
            out.setdefault(load_public_key(p), f"the trust store ({p})")
        for p in sorted((td / "roots").glob("*.pem")):
            out.setdefault(_read(p, "root CA"), f"the trust store ({p})")
    return out
