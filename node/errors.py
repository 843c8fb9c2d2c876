"""Node-level errors. They extend the one tree rooted at AutoglmError."""

from __future__ import annotations

from autoglm.protocol import (
    AutoglmError,
    ConfigError,
    IntegrityError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SignatureError,
    TrustError,
)
from autoglm.protocol._errors import SandboxError

__all__ = [
    "AutoglmError",
    "ConfigError",
    "DiskFullError",
    "IntegrityError",
    "LocalProtocolError",
    "MirrorError",
    "NoSourceError",
    "ProtocolError",
    "RemoteProtocolError",
    "SandboxError",
    "SignatureError",
    "SourceError",
    "StorageError",
    "TrustError",
    "VerificationRefused",
]


class StorageError(AutoglmError):
    """The local store cannot be read or written (permissions, missing space)."""


class DiskFullError(StorageError):
    """The disk filled up. Every piece verified so far is kept."""


class SourceError(AutoglmError):
    """A source of bytes (mirror or peer) failed at the network level."""


class MirrorError(SourceError):
    """An HTTP mirror failed or answered something that is not the file."""


class NoSourceError(SourceError):
    """No reachable source can provide the missing pieces."""


class VerificationRefused(AutoglmError):
    """An artifact failed its structural check; ``reason`` says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: refused: {reason}")
        self.path = path
        self.reason = reason
