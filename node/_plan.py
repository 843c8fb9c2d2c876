"""One fetch, described once: :class:`FetchPlan`.

Every entry point builds a plan (the ``fetch`` command from its flags, the
Python API from its arguments, the control API from a request line) and every
path runs the same plan: a fetch from mirrors alone (``api.Node.run_fetch``),
one with peers (``SwarmNode.hold``, also under ``fetch_with_peers``), and one
handed to a running node, where the plan travels as JSON
(:meth:`FetchPlan.to_wire` / :meth:`FetchPlan.from_wire`). Nothing the user
asked for is dropped on the way: headers, mirror connection settings, the
stall timeout and the engine's options all ride in the plan.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm.node._engine import FetchOptions
from autoglm.node._mirrors import MirrorConfig
from autoglm.node.errors import ConfigError
from autoglm.protocol import SignedManifest, TrustPolicy

__all__ = ["FetchPlan"]


def _frozen_headers(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    pairs = value.items() if isinstance(value, Mapping) else value
    return {str(k): str(v) for k, v in pairs}


@dataclass(frozen=True, slots=True)
class FetchPlan:
    """What to fetch, from where, with which settings; built once, used by every path.

    ``manifest`` is a :class:`SignedManifest`, a file path or an http(s) URL.
    ``headers`` go to the manifest URL and to every mirror; ``mirror_headers``
    (mirror URL -> headers) to one mirror on top of them. ``files`` limits the
    fetch to those paths (a variant); None fetches every file.
    """

    manifest: SignedManifest | str
    out: Path
    trust: TrustPolicy
    mirrors: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    mirror_headers: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    mirror: MirrorConfig = field(default_factory=MirrorConfig)
    options: FetchOptions = field(default_factory=FetchOptions)
    files: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Copies, so a caller's later edits never reach a running fetch.
        set_ = object.__setattr__
        if not isinstance(self.manifest, SignedManifest):
            set_(self, "manifest", os.fspath(self.manifest))
        set_(self, "out", Path(self.out))
        set_(self, "mirrors", tuple(str(m) for m in self.mirrors))
        set_(self, "headers", _frozen_headers(self.headers))
        set_(self, "mirror_headers", {str(u): _frozen_headers(h) for u, h in self.mirror_headers.items()})
        if self.files is not None:
            set_(self, "files", tuple(str(f) for f in self.files))
        for url in self.mirror_headers:
            if not any(m.rstrip("/") == url.rstrip("/") for m in self.mirrors):
                raise ConfigError(f"headers are given for {url}, which is not one of the mirrors")

    def __repr__(self) -> str:
        # Readable, and safe to log: the manifest by name and id, header names only (values may be secrets).
        m = self.manifest
        what = repr(m) if isinstance(m, str) else f"{m.manifest.name}@{m.manifest.version} {m.id.hex()[:16]}"
        names = sorted({*self.headers, *(k for h in self.mirror_headers.values() for k in h)})
        files = "all" if self.files is None else f"{len(self.files)} file(s)"
        return (f"FetchPlan({what} -> {str(self.out)!r}, mirrors={list(self.mirrors)}, "
                f"header names={names}, files={files})")

    def headers_for(self, mirror: str) -> dict[str, str]:
        """The headers every request to ``mirror`` carries: the common ones, then that mirror's own."""
        own: dict[str, str] = {}
        for url, h in self.mirror_headers.items():
            if url.rstrip("/") == mirror.rstrip("/"):
                own.update(h)
        return {**self.headers, **own}

    def with_options(self, **changes: Any) -> FetchPlan:
        """The same plan with some :class:`FetchOptions` fields replaced (a swarm fetch sets its own)."""
        return dataclasses.replace(self, options=dataclasses.replace(self.options, **changes))

    # -- the control API's form ------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        """A JSON-ready form for the control API (the trust policy travels as key file paths, apart)."""
        if isinstance(self.manifest, SignedManifest):
            raise ConfigError("a plan handed to a running node names its manifest by path or URL")
        return {
            "manifest": self.manifest,
            "out": str(self.out),
            "mirrors": list(self.mirrors),
            "headers": dict(self.headers),
            "mirror_headers": {u: dict(h) for u, h in self.mirror_headers.items()},
            "mirror_config": dataclasses.asdict(self.mirror),
            "options": dataclasses.asdict(self.options),
            "files": None if self.files is None else list(self.files),
        }

    @classmethod
    def from_wire(cls, value: Mapping[str, Any], trust: TrustPolicy, manifest: SignedManifest | None = None) -> FetchPlan:
        """The plan a control request describes; ConfigError for anything malformed.

        ``manifest`` replaces the request's (a name resolved by the node).
        """
        try:
            files = value.get("files")
            return cls(
                manifest if manifest is not None else _str(value["manifest"], "manifest"),
                Path(_str(value["out"], "out")),
                trust,
                mirrors=tuple(_str(m, "mirror") for m in _list(value.get("mirrors", []), "mirrors")),
                headers=_str_map(value.get("headers", {}), "headers"),
                mirror_headers={
                    _str(u, "mirror URL"): _str_map(h, "mirror headers")
                    for u, h in _map(value.get("mirror_headers", {}), "mirror_headers").items()
                },
                mirror=_settings(MirrorConfig, value.get("mirror_config", {}), "mirror_config"),
                options=_settings(FetchOptions, value.get("options", {}), "options"),
                files=None if files is None else tuple(_str(f, "file") for f in _list(files, "files")),
            )
        except KeyError as exc:
            raise ConfigError(f"fetch request without {exc.args[0]!r}") from None

    def describe(self) -> dict[str, Any]:
        """What the fetch runs with, for ``status`` (header names only: values may be secrets)."""
        return {
            "mirrors": list(self.mirrors),
            "header_names": sorted(self.headers),
            "mirror_header_names": {u: sorted(h) for u, h in self.mirror_headers.items()},
            "connections": self.mirror.initial_connections,
            "max_connections": self.mirror.max_connections,
            "stall_timeout": self.mirror.stall_timeout,
            "check_sha256": self.options.check_sha256,
            "check_space": self.options.check_space,
            "files": None if self.files is None else len(self.files),
        }


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"fetch request: {what} must be text")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise ConfigError(f"fetch request: {what} must be a list")
    return v


def _map(v: Any, what: str) -> dict[Any, Any]:
    if not isinstance(v, dict):
        raise ConfigError(f"fetch request: {what} must be an object")
    return v


def _str_map(v: Any, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, x in _map(v, what).items():
        if not isinstance(x, str):
            raise ConfigError(f"fetch request: {what} values must be text")
        out[_str(k, what)] = x
    return out


def _settings(cls: Any, v: Any, what: str) -> Any:
    """A frozen settings dataclass from JSON: known fields only, each a number, bool, text or null
    of the kind its default has."""
    given = _map(v, what)
    known = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for name, x in given.items():
        f = known.get(name)
        if f is None:
            raise ConfigError(f"fetch request: unknown {what} field {name!r}")
        default = f.default if f.default is not dataclasses.MISSING else None
        if x is None or default is None:
            ok = x is None or (isinstance(x, int | float | str) and not isinstance(x, bool)) or isinstance(x, bool)
        elif isinstance(default, bool):
            ok = isinstance(x, bool)
        elif isinstance(default, int | float):
            ok = isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            if ok and isinstance(default, int) and not isinstance(x, int):
                ok = False
        else:
            ok = isinstance(x, type(default))
        if not ok:
            raise ConfigError(f"fetch request: {what}.{name} has the wrong type")
        out[name] = x
    return cls(**out)
