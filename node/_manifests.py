"""Reading and writing signed manifest files; the trust check with the wall clock."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from autoglm.protocol import (
    ConfigError,
    Manifest,
    SignedManifest,
    TrustPolicy,
    decode_signed_manifest,
    verify_manifest,
)

__all__ = ["atomic_write", "check_manifest", "default_manifest_path", "load_signed_manifest", "write_signed_manifest"]


def default_manifest_path(data_dir: Path, name: str, version: str) -> Path:
    """Where ``publish`` writes when --out is not given: DATA_DIR/published/NAME@VERSION.agm.

    A ``/`` in NAME (``org/model``) becomes ``--``, as in the Hugging Face cache.
    """
    safe = name.replace("/", "--")
    return data_dir / "published" / f"{safe}@{version}.agm"


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temp file, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_signed_manifest(path: Path, signed: SignedManifest) -> None:
    atomic_write(path, signed.encode())


def load_signed_manifest(path: Path) -> SignedManifest:
    """Parse a manifest file. Structure only: call :func:`check_manifest` before trusting it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc.strerror}") from exc
    return decode_signed_manifest(data)


def check_manifest(signed: SignedManifest, policy: TrustPolicy, now: datetime | None = None) -> Manifest:
    """Signature and trust check at the current wall-clock time."""
    return verify_manifest(signed, policy, now or datetime.now(UTC))
