"""The node's settings: one table of keys, read from a TOML file, the environment and flags.

Each key has one value, taken from the first of: a command-line flag, an
environment variable, the config file, the built-in default. A list set at one
level replaces the lists below it (``--mirror`` replaces the file's mirrors).

The file is ``--config FILE``, else ``$AUTOGLM_NODE_CONFIG`` (set and empty:
no file), else the first that exists of
``platformdirs.user_config_dir("autoglm-node")/config.toml`` and
``/etc/autoglm-node/config.toml``. A file that was named and is missing, an
unknown key, a value of the wrong type or a bad URL is a ConfigError naming the
file and line: a misspelt setting is never silently ignored.

Strategy: validation happens here, once, into plain Python values (paths made
absolute against the config file's directory); the CLI turns those values into
what its flags would have produced. Standard library and platformdirs only: the
CLI reads settings before every command, and `--help` must stay fast.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm.protocol import ConfigError

__all__ = [
    "ENV_CONFIG",
    "KEYS",
    "SYSTEM_CONFIG",
    "ConfigFile",
    "Key",
    "Value",
    "config_candidates",
    "find_config",
    "parse_size",
    "read_config",
    "resolve",
]

ENV_CONFIG = "AUTOGLM_NODE_CONFIG"
SYSTEM_CONFIG = Path("/etc/autoglm-node/config.toml")

# Commands whose flags the keys back (a key fills a flag only for these).
_FETCHERS = ("fetch", "join")
_TRUSTERS = ("fetch", "join", "verify", "verify-manifest")


@dataclass(frozen=True, slots=True)
class Key:
    """One setting. ``name`` is its dotted TOML path; ``dest`` the argparse dest it fills."""

    name: str
    kind: str
    default: Any
    help: str
    dest: str | None = None
    flag: str | None = None
    commands: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    reserved: bool = False


KEYS: tuple[Key, ...] = (
    Key("data_dir", "path", None, "the node's home: keys, store, state (default: the platform data dir)",
        "data_dir", "--data-dir", env=("AUTOGLM_DATA_DIR", "AUTOGLM_NODE_HOME")),
    Key("log_level", "choice", "warning", "what the log shows: error, warning, info or debug",
        flag="-q / -v / -vv", choices=("error", "warning", "info", "debug")),
    Key("log_format", "choice", "text", "log lines as key=value text, or one JSON object per line",
        flag="--log-format", choices=("text", "json")),
    Key("network.listen", "list", ["/ip4/127.0.0.1/tcp/0"], "libp2p listen multiaddrs",
        "listen", "--listen", ("join",)),
    Key("network.peerwire", "hostport", "127.0.0.1:0", "bulk piece transport address HOST:PORT",
        "peerwire", "--peerwire", ("join",)),
    Key("network.bootstrap", "list", [], "peers to join through (multiaddrs with /p2p/ID); DATA_DIR/bootstrap adds more",
        "bootstrap", "--bootstrap", ("join", "fetch", "doctor")),
    Key("network.swarm_key", "path", None, "private swarm key file (64 hex characters)",
        "swarm_key", "--swarm-key", ("join",)),
    Key("network.upload_slots", "int", 8, "peers served at once", "upload_slots", "--upload-slots", ("join",),
        minimum=1),
    Key("network.up_rate", "size", None, "global upload limit in bytes/s (an integer or '50MiB')",
        "up_rate", "--up-rate", ("join",)),
    Key("network.down_rate", "size", None, "global download limit from peers in bytes/s",
        "down_rate", "--down-rate", ("join",)),
    Key("network.gateway", "hostport", None, "the Hugging Face gateway address HOST:PORT (an HF_ENDPOINT for clients)",
        "hf_gateway", "--hf-gateway", ("join",)),
    Key("network.metrics", "hostport", None, "serve Prometheus /metrics and /healthz on HOST:PORT (keep it on loopback)",
        "metrics", "--metrics", ("join",)),
    Key("mirrors.urls", "urls", [], "HTTP mirror base URLs",
        "mirror", "--mirror", (*_FETCHERS, "doctor"), env=("AUTOGLM_MIRRORS",)),
    Key("mirrors.headers", "headers", {}, "headers sent to every mirror and to a manifest URL",
        "header", "--header", ("fetch",)),
    Key("mirrors.url_headers", "url_headers", {}, "headers for one mirror: a table per URL",
        "mirror_header", "--mirror-header", ("fetch",)),
    Key("mirrors.connections", "int", 4, "initial connections per mirror", "connections", "--connections",
        ("fetch",), minimum=1),
    Key("mirrors.max_connections", "int", 16, "most connections per mirror", "max_connections",
        "--max-connections", ("fetch",), minimum=1),
    Key("mirrors.stall_timeout", "float", 20.0, "seconds without progress before a request is given up",
        "stall_timeout", "--stall-timeout", ("fetch",), minimum=0.1),
    Key("mirrors.rtt_threshold", "float", 0.2, "seconds to a response head above which a mirror is degraded",
        "mirror_rtt_threshold", "--mirror-rtt-threshold", ("fetch",), minimum=0.001),
    Key("mirrors.error_threshold", "float", 0.05, "error rate above which a mirror is degraded",
        "mirror_error_threshold", "--mirror-error-threshold", ("fetch",), minimum=0.0),
    Key("trust.keys", "paths", [], "trusted publisher public keys (DATA_DIR/trust/*.pub are trusted too)",
        "trust", "--trust", _TRUSTERS, env=("AUTOGLM_TRUST",)),
    Key("trust.roots", "paths", [], "trusted root CAs for X.509 publishers", "root", "--root", _TRUSTERS),
    Key("trust.spiffe_ids", "list", [], "allowed publisher SPIFFE IDs (a trailing / allows a prefix)",
        "spiffe_id", "--spiffe-id", _TRUSTERS),
    Key("join.seed", "seeds", [], "manifests (paths or URLs) the node holds and serves", "seed", "--seed", ("join",)),
    Key("join.out", "path", None, "where seeded models go (default DATA_DIR/models)", "out", "--out", ("join",)),
    Key("join.verify", "bool", False, "run the sandbox gate on each seeded model once it is complete",
        "verify", "--verify", ("join",)),
    Key("join.follow", "list", [], "names whose newest signed version the node keeps current",
        "follow", "--follow", ("join",)),
    Key("join.follow_keep", "int", 2, "earlier versions kept for rollback by a followed name",
        "follow_keep", "--follow-keep", ("join",), minimum=0),
    Key("join.follow_interval", "float", 60.0, "longest wait in seconds between two polls of a followed name",
        "follow_interval", "--follow-interval", ("join",), minimum=1.0),
    Key("hub.endpoints", "urls", [], "the gateway's upstream Hub endpoints besides HF_ENDPOINT (all must agree)",
        "endpoint", "--endpoint", ("join",)),
    Key("hub.manifests", "paths", [], "publish hf:// manifests (or folders of them) the gateway takes from the swarm",
        "hf_manifest", "--hf-manifest", ("join",)),
)

_BY_NAME = {k.name: k for k in KEYS}
_TABLES = {k.name.split(".", 1)[0] for k in KEYS if "." in k.name}


@dataclass(frozen=True, slots=True)
class Value:
    """A key's effective value and where it came from: flag, env, file or default."""

    key: Key
    value: Any
    source: str
    where: str = ""


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """A validated config file: key name -> (value, line)."""

    path: Path | None
    searched: tuple[Path, ...] = ()
    values: Mapping[str, tuple[Any, int | None]] = field(default_factory=dict)

    def where(self, name: str) -> str:
        line = self.values[name][1]
        return f"{self.path}:{line}" if line else str(self.path)


def config_candidates() -> tuple[Path, ...]:
    """The files looked for when neither --config nor $AUTOGLM_NODE_CONFIG names one."""
    import platformdirs

    user = Path(platformdirs.user_config_dir("autoglm-node", appauthor=False)) / "config.toml"
    return (user, SYSTEM_CONFIG)


def find_config(flag: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> tuple[Path | None, tuple[Path, ...]]:
    """The config file to read (None: none) and the paths looked at."""
    if flag is not None:
        path = Path(flag).expanduser().absolute()
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        return path, (path,)
    if ENV_CONFIG in environ:
        if not environ[ENV_CONFIG]:
            return None, ()
        path = Path(environ[ENV_CONFIG]).expanduser().absolute()
        if not path.is_file():
            raise ConfigError(f"{ENV_CONFIG}={environ[ENV_CONFIG]}: no such file")
        return path, (path,)
    candidates = config_candidates()
    return next((p for p in candidates if p.is_file()), None), candidates


def read_config(path: Path | None, searched: tuple[Path, ...] = ()) -> ConfigFile:
    """Parse and validate ``path``; every problem is reported with its line."""
    if path is None:
        return ConfigFile(None, searched)
    import difflib
    import tomllib

    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    lines = _key_lines(text)
    values: dict[str, tuple[Any, int | None]] = {}
    errors: list[str] = []

    def line_of(name: str) -> int | None:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in lines:
                return lines[".".join(parts[:n])]
        return None

    for name, raw in _flatten(data):
        line = line_of(name)
        at = f"{path}:{line}" if line else str(path)
        key = _BY_NAME.get(name)
        if key is None:
            near = difflib.get_close_matches(name, list(_BY_NAME), n=1)
            errors.append(f"{at}: unknown key {name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
            continue
        try:
            values[name] = (_check(key, raw, base=path.parent), line)
        except ValueError as exc:
            errors.append(f"{at}: {name}: {exc}")
    if errors:
        raise ConfigError("\n".join(errors))
    return ConfigFile(path, searched, values)


def resolve(cfg: ConfigFile, environ: Mapping[str, str], flags: Mapping[str, tuple[Any, str]]) -> dict[str, Value]:
    """Every key's effective value. ``flags``: key name -> (value as the flag gave it, the flag)."""
    out: dict[str, Value] = {}
    for key in KEYS:
        if key.name in flags:
            value, flag = flags[key.name]
            if key.kind == "urls":
                for url in value:
                    _check_url(url, f"{flag} {url!r}")
            out[key.name] = Value(key, value, "flag", flag)
            continue
        env = next((e for e in key.env if environ.get(e)), None)
        if env is not None:
            try:
                out[key.name] = Value(key, _from_env(key, environ[env]), "env", env)
            except (ValueError, ConfigError) as exc:
                raise ConfigError(f"{env}: {exc}") from None
        elif key.name in cfg.values:
            out[key.name] = Value(key, cfg.values[key.name][0], "file", cfg.where(key.name))
        else:
            out[key.name] = Value(key, _copy(key.default), "default")
    return out


# -- validation -------------------------------------------------------------

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'8MiB', '512k', '1G', '4096' -> bytes (ValueError otherwise)."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in _SIZE_UNITS or not num:
        raise ValueError(f"not a size: {text!r} (try 8MiB)")
    try:
        return int(float(num) * _SIZE_UNITS[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r} (try 8MiB)") from None


def _check_url(url: str, what: str) -> str:
    if not re.match(r"^https?://[^/\s]+", url):
        example = "" if ":/" in url else f" (e.g. https://{url.lstrip('/')})"
        raise ConfigError(f"{what}: a mirror URL needs http:// or https:// and a host{example}")
    return url


def _type_name(v: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(v), type(v).__name__)


def _str_list(raw: object) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ValueError(f"must be an array of strings, got {_type_name(raw)}"
                         + (" with other items" if isinstance(raw, list) else ""))
    return list(raw)


def _headers(raw: object) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ValueError(f"must be a table of header names to strings, got {_type_name(raw)}")
    for k, v in raw.items():
        if not _HEADER_NAME.match(k):
            raise ValueError(f"{k!r} is not a header name")
        if not isinstance(v, str):
            raise ValueError(f"header {k!r} must be a string, got {_type_name(v)}")
    return dict(raw)


def _check(key: Key, raw: object, base: Path) -> Any:
    """A file value as a Python value (ValueError says what is wrong)."""
    kind = key.kind
    if kind == "bool":
        if not isinstance(raw, bool):
            raise ValueError(f"must be true or false, got {_type_name(raw)}")
        return raw
    if kind in ("int", "float"):
        ok = isinstance(raw, int) if kind == "int" else isinstance(raw, int | float)
        if not ok or isinstance(raw, bool):
            raise ValueError(f"must be {'an integer' if kind == 'int' else 'a number'}, got {_type_name(raw)}")
        assert isinstance(raw, int | float)
        if key.minimum is not None and raw < key.minimum:
            raise ValueError(f"must be at least {key.minimum:g}, got {raw}")
        return float(raw) if kind == "float" else raw
    if kind == "size":
        if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
            return raw
        if isinstance(raw, str):
            return parse_size(raw)
        raise ValueError(f"must be a byte count (an integer, or a string such as '50MiB'), got {_type_name(raw)}")
    if kind in ("list", "urls", "paths", "seeds"):
        items = _str_list(raw)
        if kind == "urls":
            for url in items:
                try:
                    _check_url(url, repr(url))
                except ConfigError as exc:
                    raise ValueError(str(exc)) from None
        if kind == "paths":
            return [_path(p, base) for p in items]
        if kind == "seeds":
            return [s if s.startswith(("http://", "https://")) else str(_path(s, base)) for s in items]
        return items
    if kind == "headers":
        return _headers(raw)
    if kind == "url_headers":
        if not isinstance(raw, dict):
            raise ValueError(f"must be a table of mirror URLs to header tables, got {_type_name(raw)}")
        out = {}
        for url, hs in raw.items():
            try:
                _check_url(url, repr(url))
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            out[url] = _headers(hs)
        return out
    if not isinstance(raw, str):
        raise ValueError(f"must be a string, got {_type_name(raw)}")
    if kind == "path":
        return _path(raw, base)
    if kind == "choice" and raw not in key.choices:
        raise ValueError(f"must be one of {', '.join(key.choices)}, got {raw!r}")
    if kind == "hostport":
        host, _, port = raw.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"must be HOST:PORT, got {raw!r}")
    return raw


def _path(text: str, base: Path) -> Path:
    """Relative paths in a config file are relative to the file's directory."""
    p = Path(text).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _from_env(key: Key, text: str) -> Any:
    """An environment value: lists split on whitespace or commas (paths on os.pathsep)."""
    if key.kind == "paths":
        return [Path(p).expanduser().resolve() for p in text.split(os.pathsep) if p]
    if key.kind in ("list", "urls"):
        items = [s for s in re.split(r"[\s,]+", text) if s]
        if key.kind == "urls":
            for url in items:
                _check_url(url, repr(url))
        return items
    if key.kind == "path":
        return Path(text).expanduser().resolve()
    return _check(key, text, Path.cwd())


def _copy(v: Any) -> Any:
    return list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v


def _flatten(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """(dotted name, value) for every setting in a parsed file; tables of headers stay whole."""
    out: list[tuple[str, Any]] = []
    for k, v in data.items():
        if k in _BY_NAME or k not in _TABLES or not isinstance(v, dict):
            out.append((k, v))
            continue
        for k2, v2 in v.items():
            out.append((f"{k}.{k2}", v2))
    return out


# -- lines ------------------------------------------------------------------
# tomllib reports no positions for values: find the line of each key by
# scanning the text for table headers and `key =` lines. Only what the error
# messages need: dotted keys, quoted keys, [table] and [[array]] headers.

_HEADER_LINE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_LINE = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")
_PART = re.compile(r"""[A-Za-z0-9_-]+|"([^"]*)"|'([^']*)'""")


def _dotted(text: str) -> str:
    parts = []
    for m in _PART.finditer(text):
        parts.append(m.group(1) if m.group(1) is not None else m.group(2) if m.group(2) is not None else m.group(0))
    return ".".join(parts)


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key or table name -> the line (1-based) where it is first set."""
    lines: dict[str, int] = {}

    def record(name: str, n: int) -> None:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            lines.setdefault(".".join(parts[:i]), n)

    table = ""
    depth = 0  # inside a multi-line array: its lines set no keys
    for n, line in enumerate(text.splitlines(), 1):
        if depth > 0:
            depth += line.count("[") - line.count("]")
            continue
        m = _HEADER_LINE.match(line)
        if m and not _KEY_LINE.match(line):
            table = _dotted(m.group(1))
            record(table, n)
            continue
        m = _KEY_LINE.match(line)
        if m:
            name = _dotted(m.group(1))
            record(f"{table}.{name}" if table else name, n)
            rest = line[m.end():]
            depth = max(0, rest.count("[") - rest.count("]"))
    return lines
