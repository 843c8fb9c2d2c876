"""Public API of the node (re-exported by :mod:`autoglm.node`; see docs/api.md).

``fetch(...)`` and ``autoglm.node.open_model(...)`` block (scripts, notebooks);
``afetch(...)`` / ``aopen_model(...)`` are awaitable under trio or asyncio;
``async with open_node(config) as node: await node.fetch(...)`` is the trio
form with progress events and peer sources.
Progress flows as :mod:`autoglm.node._progress` events over a trio memory
channel that the caller passes in (and consumes).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from autoglm.node._config import resolve_data_dir
from autoglm.node._engine import Fetch, FetchOptions, FetchResult
from autoglm.node._http import open_connection, parse_url, request_target
from autoglm.node._keys import TrustLike, as_trust_policy
from autoglm.node._manifests import check_manifest, load_signed_manifest
from autoglm.node._mirrors import USER_AGENT, MirrorConfig, MirrorSource
from autoglm.node._plan import FetchPlan
from autoglm.node._progress import Event
from autoglm.node._sources import Source
from autoglm.node._store import Download, Store
from autoglm.node._sync import current_async_library, run_blocking, run_trio, run_trio_from_asyncio
from autoglm.node.errors import ConfigError, MirrorError, RemoteProtocolError
from autoglm.protocol import Manifest, SignedManifest, TrustPolicy, decode_signed_manifest

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from autoglm.node._gate import ModelHandle

__all__ = [
    "FetchOptions",
    "FetchPlan",
    "FetchResult",
    "Node",
    "NodeConfig",
    "afetch",
    "aopen_model",
    "fetch",
    "load_manifest",
    "open_node",
]

MAX_MANIFEST = 128 << 20


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Where the node keeps its state. ``data_dir=None``: $AUTOGLM_NODE_HOME or the platform default.

    ``mirror`` is the mirror configuration of plans built by :meth:`Node.plan`.
    """

    data_dir: Path | None = None
    mirror: MirrorConfig = field(default_factory=MirrorConfig)


async def _get_url(url: str, headers: Mapping[str, str] | None = None) -> bytes:
    u = parse_url(url)
    conn = await open_connection(u)
    try:
        with trio.fail_after(60):
            resp = await conn.request("GET", request_target(conn, u), {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {})})
            if resp.status != 200:
                raise MirrorError(f"{url}: HTTP {resp.status} {resp.reason}")
            if resp.content_length is not None and resp.content_length > MAX_MANIFEST:
                raise MirrorError(f"{url}: manifest over {MAX_MANIFEST} bytes")
            body = await conn.read_all(MAX_MANIFEST)
            if resp.headers.get("content-type", "").lower().startswith("text/html") or body.lstrip()[:1] == b"<":
                raise RemoteProtocolError(f"{url} answered an HTML page, not a manifest; check the URL")
            return body
    except trio.TooSlowError as exc:
        raise MirrorError(f"{url}: timed out fetching the manifest") from exc
    finally:
        await conn.aclose()


async def load_manifest(
    manifest: SignedManifest | str | os.PathLike[str], trust: TrustPolicy, headers: Mapping[str, str] | None = None
) -> tuple[SignedManifest, Manifest]:
    """Read a manifest (object, path or http(s) URL) and check signature and trust. Raises on failure."""
    if isinstance(manifest, SignedManifest):
        signed = manifest
    elif isinstance(manifest, str) and manifest.startswith(("http://", "https://")):
        data = await _get_url(manifest, headers)
        try:
            signed = decode_signed_manifest(data)
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"{manifest} is not a valid manifest: {exc}") from exc
    else:
        signed = await trio.to_thread.run_sync(load_signed_manifest, Path(manifest))
    return signed, check_manifest(signed, trust)


class Node:
    """A running node. Create with :func:`open_node`."""

    def __init__(self, store: Store, config: NodeConfig) -> None:
        self.store = store
        self.config = config

    def mirror_sources(self, plan: FetchPlan) -> list[MirrorSource]:
        """The plan's mirrors as sources, sharing their connections' scores (one group)."""
        group: list[MirrorSource] = []
        for url in plan.mirrors:
            MirrorSource(url, headers=plan.headers_for(url), config=plan.mirror, peers=group)
        return group

    def plan(
        self,
        manifest: SignedManifest | str | os.PathLike[str],
        *,
        out: str | os.PathLike[str],
        trust: TrustLike | None = None,
        mirrors: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
        mirror_headers: Mapping[str, Mapping[str, str]] | None = None,
        mirror: MirrorConfig | None = None,
        files: Iterable[str] | None = None,
        options: FetchOptions | None = None,
    ) -> FetchPlan:
        """A :class:`FetchPlan` from keyword arguments; ``mirror`` defaults to this node's config.

        ``trust`` as for :func:`fetch` (None: this node's trust store); with no
        ``mirrors``, a manifest URL's directory is the mirror.
        """
        policy, _ = as_trust_policy(trust, self.store.data_dir)
        return FetchPlan(
            manifest if isinstance(manifest, SignedManifest) else os.fspath(manifest), Path(out), policy,
            mirrors=_implied_mirrors(manifest, mirrors, required=False), headers=headers or {}, mirror_headers=mirror_headers or {},
            mirror=mirror or self.config.mirror, options=options or FetchOptions(),
            files=None if files is None else tuple(files),
        )

    async def run_fetch(
        self,
        plan: FetchPlan,
        *,
        sources: Iterable[Source] = (),
        events: trio.MemorySendChannel[Event] | None = None,
        task_status: TaskStatus[Fetch] = trio.TASK_STATUS_IGNORED,
    ) -> FetchResult:
        """Verify the plan's manifest, then fetch its files into ``plan.out`` (mirrors and ``sources``).

        ``task_status.started`` hands over the running :class:`Fetch` (to add
        peer sources while it runs). ``events`` is closed at the end.
        """
        try:
            _, download = await self.open_download(plan)
            srcs: list[Source] = [*self.mirror_sources(plan), *sources]
            fetch = Fetch(self.store, download, srcs, events, plan.options)
            return await fetch.run(task_status=task_status)
        finally:
            if events is not None:
                await events.aclose()

    async def open_download(self, plan: FetchPlan) -> tuple[SignedManifest, Download]:
        """Check the plan's manifest (signature, trust) and open its download in the store."""
        signed, _ = await load_manifest(plan.manifest, plan.trust, plan.headers)
        out_dir = await trio.to_thread.run_sync(lambda: plan.out.expanduser().resolve())
        return signed, await trio.to_thread.run_sync(self.store.open_download, signed, out_dir, plan.files)

    async def fetch(self, manifest: SignedManifest | str | os.PathLike[str], **kwargs: Any) -> FetchResult:
        """Fetch with a plan built from keyword arguments (see :meth:`plan`; also ``sources``, ``events``)."""
        run_kw = {k: kwargs.pop(k) for k in ("sources", "events") if k in kwargs}
        return await self.run_fetch(self.plan(manifest, **kwargs), **run_kw)


@asynccontextmanager
async def open_node(config: NodeConfig | None = None) -> AsyncIterator[Node]:
    """Open the store under the data directory; yields a :class:`Node`."""
    config = config or NodeConfig()
    data_dir = resolve_data_dir(config.data_dir)
    store = await trio.to_thread.run_sync(Store, data_dir)
    try:
        yield Node(store, config)
    finally:
        store.close()


def _implied_mirrors(manifest: SignedManifest | str | os.PathLike[str], mirrors: Sequence[str], required: bool = True) -> tuple[str, ...]:
    """The mirrors given; with none, a manifest URL's directory (the usual layout: manifest beside the files)."""
    if mirrors:
        return tuple(str(m) for m in mirrors)
    if isinstance(manifest, str) and manifest.startswith(("http://", "https://")):
        return (manifest.rsplit("/", 1)[0] + "/",)
    if not required:  # a node fetch may have only peer sources
        return ()
    raise ConfigError("give at least one mirror URL (mirrors=[...]), or the manifest as an http(s) URL beside the files")


async def _fetch_trio(
    manifest: SignedManifest | str | os.PathLike[str],
    out: str | os.PathLike[str],
    trust: TrustLike | None,
    mirrors: tuple[str, ...],
    data_dir: str | os.PathLike[str] | None,
    files: Iterable[str] | None,
    options: FetchOptions | None,
    headers: Mapping[str, str] | None,
) -> FetchResult:
    async with open_node(NodeConfig(Path(data_dir) if data_dir is not None else None)) as node:
        return await node.fetch(manifest, out=out, trust=trust, mirrors=mirrors, files=files, options=options, headers=headers)


def fetch(
    manifest: SignedManifest | str | os.PathLike[str],
    *,
    out: str | os.PathLike[str],
    trust: TrustLike | None = None,
    mirrors: Sequence[str] = (),
    data_dir: str | os.PathLike[str] | None = None,
    files: Iterable[str] | None = None,
    options: FetchOptions | None = None,
    headers: Mapping[str, str] | None = None,
) -> FetchResult:
    """Fetch a model into ``out`` and return the summary; blocks until done (no progress display).

    Works from a plain script, and from a notebook or any thread that already
    runs an event loop (the fetch then runs in a worker thread). ``manifest``
    is a path or an http(s) URL; with no ``mirrors``, a manifest URL's
    directory is the mirror. ``trust``: key file(s), key bytes or a
    :class:`TrustPolicy` (see :func:`trust_policy`); None uses the data
    directory's trust store. ``data_dir`` None: $AUTOGLM_DATA_DIR or the
    platform default. Re-running resumes; raises on failure (autoglm.node.errors).
    """
    return run_trio(_fetch_trio, manifest, out, trust, _implied_mirrors(manifest, mirrors), data_dir, files, options, headers)


async def afetch(
    manifest: SignedManifest | str | os.PathLike[str],
    *,
    out: str | os.PathLike[str],
    trust: TrustLike | None = None,
    mirrors: Sequence[str] = (),
    data_dir: str | os.PathLike[str] | None = None,
    files: Iterable[str] | None = None,
    options: FetchOptions | None = None,
    headers: Mapping[str, str] | None = None,
) -> FetchResult:
    """:func:`fetch` for async code, under trio or asyncio (arguments as for :func:`fetch`).

    Under trio it runs in the caller's loop (cancel it like any trio call);
    under asyncio it runs in a worker thread, so the loop keeps serving its
    other tasks, and cancelling the task stops the fetch (a later call resumes).
    """
    mirrors_ = _implied_mirrors(manifest, mirrors)
    if current_async_library() == "trio":
        return await _fetch_trio(manifest, out, trust, mirrors_, data_dir, files, options, headers)
    return await run_trio_from_asyncio(_fetch_trio, manifest, out, trust, mirrors_, data_dir, files, options, headers)


async def aopen_model(name_or_path: str | os.PathLike[str], **kwargs: Any) -> ModelHandle:
    """``autoglm.node.open_model`` in a worker thread, under trio or asyncio (same arguments)."""
    from autoglm.node._gate import open_model  # wasmtime loads when a model is opened

    return await run_blocking(open_model, name_or_path, **kwargs)
