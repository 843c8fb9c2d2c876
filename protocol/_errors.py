"""The one exception tree of autoglm-node.

Every error the package raises on purpose derives from :class:`AutoglmError`.
Transport and OS errors are translated at the boundary (``raise X from exc``).
"""

from __future__ import annotations

__all__ = [
    "AutoglmError",
    "ConfigError",
    "IntegrityError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "SandboxError",
    "SignatureError",
    "TrustError",
]


class AutoglmError(Exception):
    """Root of every error autoglm-node raises on purpose."""


class ConfigError(AutoglmError):
    """Bad configuration or command-line input from the local user."""


class ProtocolError(AutoglmError):
    """Bytes or messages that break the rules of a format or the wire."""


class LocalProtocolError(ProtocolError):
    """We were asked to produce something the format does not allow."""


class RemoteProtocolError(ProtocolError):
    """Input from outside (a file, a peer, a mirror) is malformed or over a limit."""


class IntegrityError(AutoglmError):
    """A hash or a signature does not match.

    The source that produced the bytes is penalised and never retried for the
    same piece.
    """


class SignatureError(IntegrityError):
    """A signature is missing, malformed or does not verify."""


class TrustError(AutoglmError):
    """The signature is valid but the signer is not trusted for this use."""


class SandboxError(AutoglmError):
    """The verification sandbox itself failed (bad module, pin mismatch, host error)."""
