"""The CLI's log lines (structured, secrets scrubbed) and the level py-libp2p logs at.

The level py-libp2p logs at is kept across ``import libp2p``.

Importing libp2p runs its ``setup_logging()``: unless ``LIBP2P_DEBUG`` is set,
the ``libp2p`` logger gets level WARNING, no handler and no propagation, so
its warnings ("Failed to read DHT message from stream: ...", one per closed
DHT stream) reach stderr bare through logging's last-resort handler and
ignore the level the CLI chose. The CLI records its choice here, before
libp2p is imported; node/_p2p.py applies it again right after the import.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Any

__all__ = [
    "ContextFilter",
    "JsonFormatter",
    "KeyValueFormatter",
    "add_secret",
    "apply_libp2p_level",
    "log_model",
    "redact",
    "secrets_from_args",
    "set_libp2p_level",
    "setup_logging",
]

_NOISY = ("libp2p", "multiaddr", "async_service")
_level = logging.CRITICAL


def set_libp2p_level(level: int) -> None:
    """Log py-libp2p (and its helpers) at ``level`` through the root handlers."""
    global _level
    _level = level
    for name in _NOISY:
        logging.getLogger(name).setLevel(level)
    apply_libp2p_level()


def apply_libp2p_level() -> None:
    """Undo what ``import libp2p`` did to its logger (LIBP2P_DEBUG keeps libp2p's own setup)."""
    if os.environ.get("LIBP2P_DEBUG"):
        return
    lg = logging.getLogger("libp2p")
    lg.setLevel(_level)
    lg.propagate = True
    # Some modules set their own level at import (network.auto_connector: INFO).
    for name, child in list(logging.root.manager.loggerDict.items()):
        if name.startswith("libp2p.") and isinstance(child, logging.Logger) and child.level != logging.NOTSET:
            child.setLevel(_level)


# -- structured lines ---------------------------------------------------------------
#
# Strategy: the core logs with plain ``log.info("...", args)``; what makes a line
# structured is added here, once, by a filter on the handler:
#   * ``model`` comes from a context variable the swarm node sets around a fetch
#     (trio tasks inherit it), or from ``extra={"model": ...}``;
#   * ``source`` and ``peer`` come from ``extra`` or from a log argument that is a
#     source id (``peer:<id>``, ``mirror:<url>``, ``hub:...``, ``local:store``),
#     so existing calls need no change;
#   * secrets are scrubbed from the finished line: every registered secret
#     (header values, the swarm key, tokens in the environment) and anything
#     shaped like a bearer token or a Hugging Face token.

_model: contextvars.ContextVar[str | None] = contextvars.ContextVar("autoglm_log_model", default=None)
_FIELDS = ("model", "peer", "source")
_SOURCE_PREFIXES = ("peer:", "mirror:", "hub:", "local:")
_secrets: set[str] = set()
_PATTERNS = (
    re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(?:bearer\s+|basic\s+|token\s+)?[^\s\"',}]+"),
    re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"()\bhf_[A-Za-z0-9]{16,}"),
)
_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AUTOGLM_TOKEN")


@contextlib.contextmanager
def log_model(model: str) -> Iterator[None]:
    """Every line logged inside (and in tasks started inside) carries ``model``."""
    token = _model.set(model)
    try:
        yield
    finally:
        _model.reset(token)


def secrets_from_args(args: Any) -> None:
    """Header values given on the command line or by the config file (``NAME: VALUE``, ``URL=NAME: VALUE``)."""
    for h in [*(getattr(args, "header", None) or []), *(getattr(args, "mirror_header", None) or [])]:
        add_secret(str(h).split(":", 1)[-1].strip())


def add_secret(value: str | bytes | None) -> None:
    """Never print ``value`` (or its hex form, for bytes) in a log line."""
    if isinstance(value, bytes):
        value = value.hex()
    if value and len(value) >= 6:
        _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every registered secret and token-shaped value replaced by ``***``."""
    for s in sorted(_secrets, key=len, reverse=True):
        if s in text:
            text = text.replace(s, "***")
    for pat in _PATTERNS:
        text = pat.sub(lambda m: m.group(1) + "***", text)
    return text


class ContextFilter(logging.Filter):
    """Puts ``model``, ``peer`` and ``source`` on the record when the line has them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "model", None) is None:
            record.model = _model.get()
        source = getattr(record, "source", None)
        if source is None:
            args = record.args if isinstance(record.args, tuple) else ()
            source = next((a for a in args if isinstance(a, str) and a.startswith(_SOURCE_PREFIXES)), None)
            record.source = source
        if getattr(record, "peer", None) is None and isinstance(source, str) and source.startswith("peer:"):
            record.peer = source.split(":", 1)[1].split("@", 1)[0]
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k in _FIELDS if (v := getattr(record, k, None)) is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, then model/peer/source when known."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "message": record.getMessage(), **_fields(record)}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out))


class KeyValueFormatter(logging.Formatter):
    """``2026-12-07T18:00:00.123Z INFO logger: message model=... peer=... source=...``.

    The head stays the familiar ``TIME LEVEL logger: message`` (grep and
    journald users read it); the known fields follow as key=value pairs.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [f"{ts} {record.levelname} {record.name}: {record.getMessage()}"]
        parts += [f"{k}={_quote(str(v))}" for k, v in _fields(record).items()]
        if record.exc_info:
            parts.append(self.formatException(record.exc_info))
        return redact(" ".join(parts[:-1] if record.exc_info else parts) + ("\n" + parts[-1] if record.exc_info else ""))


def _quote(v: str) -> str:
    if v and not any(c in v for c in ' "=\n\t\\'):
        return v
    return json.dumps(v)


def setup_logging(level_name: str, log_format: str, verbose: int) -> None:
    """The CLI's logging: one line per record on stderr, JSON or key=value, secrets scrubbed."""
    for env in _TOKEN_ENV:
        add_secret(os.environ.get(env))
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else KeyValueFormatter())
    logging.basicConfig(level=getattr(logging, level_name.upper()), handlers=[handler])
    logging.captureWarnings(True)
    # py-libp2p logs a great deal, and logs ERROR for what is routine here (a
    # peer that closed a stream); keep it quiet unless -vvv.
    set_libp2p_level(logging.DEBUG if verbose >= 3 else logging.CRITICAL)
