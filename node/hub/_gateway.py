"""The Hugging Face gateway: an ``HF_ENDPOINT`` served by the node (``join --hf-gateway 127.0.0.1:PORT``).

Unmodified clients (``HF_ENDPOINT=http://127.0.0.1:PORT hf download ORG/REPO``,
``snapshot_download``, ``hf_hub_download``, transformers, vLLM) get their files
through the node's own hub fetch (``_fetch.fetch_hub``): verified against the
Hub's hashes and stored once, in the node's Hugging Face cache.

Theory of operation
-------------------
What huggingface_hub 2.x calls, and what the gateway answers:

* ``GET /api/models/{repo}[/revision/{rev}]``: model info (``sha``, ``siblings``);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=…``: the file list, one page
  (``oid``, ``size``, ``lfs``; no ``xetHash``);
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (the cache's
  blob name: LFS SHA-256 or git blob id), ``X-Linked-Etag``/``X-Linked-Size`` for LFS
  files, ``Content-Length``, ``Accept-Ranges``; ``Range`` gets 206 with ``Content-Range``;
* the Hub's refusals with the ``X-Error-Code`` huggingface_hub maps to its exceptions
  (``RepoNotFound`` 401, ``RevisionNotFound`` 404, ``EntryNotFound`` 404, ``GatedRepo`` 403).

No ``X-Xet-*`` header is ever sent, so clients stay on plain HTTP to us.

A revision is resolved once per endpoint set by :func:`~._api.resolve_snapshot`
(a commit for good, a branch or tag for ``revision_ttl`` seconds), one
resolution shared by every request that needs it. A file's bytes come from a
*flight*: one :func:`~._fetch.fetch_hub` of that single file (its own manifest,
so flights of one commit run side by side), shared by every client that asks
for the same blob (single-flight per repository and blob). A flight follows
the engine's ``PieceVerified`` events: clients are served the contiguous
prefix of recorded pieces as it grows, except the file's last piece, which
waits until the whole file matched its SHA-256 or git blob id and was moved
into ``blobs/``. A file whose bytes do not match is therefore never delivered
whole: the clients' responses are cut short (they see an incomplete body and
raise), and for ``failure_ttl`` seconds the gateway answers 502 for it rather
than fetching it again. A blob a flight completed is served from disk.

Budgets per client: at most ``max_clients`` connections (more get 503), a
request head within ``header_timeout`` (16 KiB at most), ``idle_timeout``
between requests, ``send_timeout`` without progress while sending; request
bodies are refused (413). Clients' ``Authorization`` headers are ignored: the
gateway reads upstream with the node's own token, so anyone who reaches it
reads what that token can. It binds 127.0.0.1 by default.

Loops: an upstream endpoint at the gateway's own address is refused before
start; after start, each endpoint is asked ``/api/autoglm-gateway`` and an
answer carrying this gateway's ``X-Autoglm-Gateway`` id (a random value every
response carries) means the upstream is the gateway itself: refused.

Seam for the swarm: :meth:`Gateway._swarm_source` is where a trusted signed
manifest covering the repository and commit (made by ``publish hf://``, not
built yet) will let a flight fetch from peers, with the Hub as web seed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h11
import trio

from autoglm.node._engine import FetchOptions, collapse_group
from autoglm.node._mirror_server import _parse_range
from autoglm.node._mirrors import USER_AGENT, MirrorConfig
from autoglm.node._progress import Event, PieceVerified
from autoglm.node._store import Store, _staging_dir
from autoglm.node.errors import AutoglmError, ConfigError, IntegrityError, SourceError
from autoglm.protocol._pieces import plan_fixed

from ._api import HubAccessError, HubFile, HubRef, RepoSnapshot, parse_ref, resolve_snapshot
from ._cache import hub_cache_dir, link_snapshot, repo_folder, write_ref, write_tree
from ._fetch import PIECE_SIZE, HubFetchPlan, fetch_hub

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = ["GATEWAY_HEADER", "Gateway", "GatewayConfig", "GatewayStats", "check_upstreams", "parse_hostport", "serve_gateway"]

log = logging.getLogger(__name__)

GATEWAY_HEADER = "X-Autoglm-Gateway"
PROBE_PATH = "/api/autoglm-gateway"
_MAX_HEADER = 16 * 1024
_CHUNK = 1 << 20
_MAX_RESOLUTIONS = 4096
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", "[::1]"}


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    endpoints: tuple[str, ...]
    token: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 0
    cache_dir: Path | None = None  # default: hub_cache_dir()
    piece_size: int = PIECE_SIZE
    max_clients: int = 64
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    send_timeout: float = 60.0
    revision_ttl: float = 10.0  # a branch or tag is resolved again after this long
    failure_ttl: float = 30.0  # a failed file is answered 502 this long before it is fetched again
    probe_timeout: float = 5.0


@dataclass(slots=True)
class GatewayStats:
    clients: int = 0
    requests: int = 0
    flights: int = 0
    flights_failed: int = 0
    bytes_served: int = 0
    refused_clients: int = 0


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--hf-gateway {text!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return host, int(port)


def check_upstreams(host: str, port: int, endpoints: Sequence[str]) -> None:
    """Refuse an upstream endpoint that is the gateway's own address (before binding)."""
    for ep in endpoints:
        u = urllib.parse.urlsplit(ep)
        ep_port = u.port or (443 if u.scheme == "https" else 80)
        same_host = (u.hostname or "") in _LOOPBACK | {host} if host in _LOOPBACK else u.hostname == host
        if port and ep_port == port and same_host:
            raise ConfigError(f"the gateway's upstream {ep} is the gateway itself ({host}:{port}); "
                              "give the Hub or a mirror with --endpoint or HF_ENDPOINT")


class _Abort(Exception):
    """The client's response cannot be completed: close its connection."""


@dataclass(slots=True)
class _Resolution:
    done: trio.Event = field(default_factory=trio.Event)
    snapshot: RepoSnapshot | None = None
    error: Exception | None = None
    at: float = 0.0


class _Flight:
    """One file being fetched for all the clients that want it."""

    def __init__(self, repo_dir: Path, f: HubFile, piece_size: int) -> None:
        self.file = f
        self.repo_dir = repo_dir
        self.blob = repo_dir / "blobs" / f.etag
        self.pieces = plan_fixed(f.size, piece_size)
        self.recorded: set[int] = set()
        self.contiguous = 0  # pieces recorded from the start
        self.staging: Path | None = None
        self.done = False
        self.error: Exception | None = None
        self.failed_at = 0.0
        self.changed = trio.Event()
        self.also: dict[tuple[str, str], HubFile] = {}  # (commit, path) of other requests for this blob

    @property
    def ready(self) -> int:
        """Bytes that may be served: everything once verified, else the recorded prefix less the last piece."""
        if self.done:
            return self.file.size
        if self.contiguous >= len(self.pieces):
            return self.pieces[-1][0] if self.pieces else 0
        return self.pieces[self.contiguous][0] if self.contiguous else 0

    def bump(self) -> None:
        old, self.changed = self.changed, trio.Event()
        old.set()

    def on_event(self, ev: Event) -> None:
        if isinstance(ev, PieceVerified):
            if self.staging is None:
                self.staging = _staging_dir(self.repo_dir, ev.manifest_id) / "0.part"
            self.recorded.add(ev.index)
            moved = False
            while self.contiguous in self.recorded:
                self.contiguous += 1
                moved = True
            if moved:
                self.bump()

    def read(self, pos: int, n: int) -> bytes:
        """Worker thread: ``n`` bytes at ``pos`` from the blob (verified) or the staging file (recorded prefix)."""
        paths = [self.blob] if self.done else [p for p in (self.staging, self.blob) if p is not None]
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue  # moved from staging into blobs/ meanwhile
            try:
                data = os.pread(fd, n, pos)
            finally:
                os.close(fd)
            if len(data) == n:
                return data
        raise OSError(errno.EIO, f"{self.file.path}: bytes {pos}..{pos + n} are not readable")


class Gateway:
    """The gateway's state: resolutions, flights and budgets. Run with :meth:`serve`."""

    def __init__(self, store: Store, config: GatewayConfig) -> None:
        self.store = store
        self.config = config
        self.cache_dir = config.cache_dir or hub_cache_dir()
        self.id = secrets.token_hex(16)
        self.stats = GatewayStats()
        self.address: tuple[str, int] = (config.host, config.port)
        self._resolutions: dict[tuple[str, str], _Resolution] = {}
        self._trees: set[tuple[str, str]] = set()
        self._flights: dict[tuple[str, str], _Flight] = {}
        self._nursery: trio.Nursery | None = None
        self._heads: dict[h11.Connection, bool] = {}  # connection -> answering a HEAD
        self._mirror_config = MirrorConfig(max_request_bytes=max(2 * config.piece_size, 4 << 20))
        self._options = FetchOptions(max_consecutive_failures=20)

    # -- serving ------------------------------------------------------------
    async def serve(self, *, task_status: TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; reports the bound (host, port). ConfigError if an upstream is this gateway."""
        cfg = self.config
        check_upstreams(cfg.host, cfg.port, cfg.endpoints)
        try:
            listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
        except OSError as exc:
            raise ConfigError(f"--hf-gateway {cfg.host}:{cfg.port}: cannot listen: {exc.strerror}") from exc
        bound = listeners[0].socket.getsockname()
        self.address = (bound[0], bound[1])
        check_upstreams(cfg.host, bound[1], cfg.endpoints)
        refused: ConfigError | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(trio.serve_listeners, self._client, listeners)
            try:
                await self._probe_loops()
            except ConfigError as exc:
                refused = exc
                nursery.cancel_scope.cancel()
            else:
                task_status.started(self.address)
        if refused is not None:
            raise refused

    async def _probe_loops(self) -> None:
        from autoglm.node._http import get_small

        for ep in self.config.endpoints:
            try:
                resp, _, _ = await get_small(ep + PROBE_PATH, {"User-Agent": USER_AGENT}, limit=4096,
                                             time_limit=self.config.probe_timeout)
            except (SourceError, OSError):
                continue  # not reachable now: the fetches will say so
            if resp.headers.get(GATEWAY_HEADER.lower()) == self.id:
                raise ConfigError(f"the gateway's upstream {ep} leads back to this gateway (a loop); "
                                  "give the Hub or a mirror with --endpoint or HF_ENDPOINT")

    async def _client(self, stream: trio.SocketStream) -> None:
        try:
            if self.stats.clients >= self.config.max_clients:
                self.stats.refused_clients += 1
                with trio.move_on_after(2):
                    await stream.send_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 5\r\n"
                                          b"Connection: close\r\n\r\n")
                return
            self.stats.clients += 1
            try:
                await self._connection(stream)
            finally:
                self.stats.clients -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, _Abort):
            pass
        except Exception:  # one client's failure must not stop the gateway
            log.exception("gateway: a client's request failed")
        finally:
            await _close(stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        cfg = self.config
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER)
        while True:
            deadline: float | None = None
            while True:
                ev = conn.next_event()
                if ev is not h11.NEED_DATA:
                    break
                wait = cfg.idle_timeout if deadline is None else deadline - trio.current_time()
                with trio.move_on_after(max(wait, 0.0)) as scope:
                    data = await stream.receive_some(65536)
                if scope.cancelled_caught:
                    return
                if deadline is None:
                    deadline = trio.current_time() + cfg.header_timeout
                conn.receive_data(data)
            if not isinstance(ev, h11.Request):
                return  # ConnectionClosed, or PAUSED after a response we could not finish
            self.stats.requests += 1
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in ev.headers}
            if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
                await self._answer(stream, conn, 413, {"error": "request bodies are not accepted"}, [("Connection", "close")])
                return
            while not isinstance(conn.next_event(), h11.EndOfMessage):
                pass
            self._heads[conn] = ev.method == b"HEAD"
            try:
                await self._route(stream, conn, ev.method.decode("latin-1"), ev.target.decode("latin-1"), headers)
            finally:
                self._heads.pop(conn, None)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _send(self, stream: trio.SocketStream, data: bytes | None) -> None:
        if not data:
            return
        with trio.move_on_after(self.config.send_timeout) as scope:
            await stream.send_all(data)
        if scope.cancelled_caught:
            raise _Abort("client too slow")

    async def _head(self, stream: trio.SocketStream, conn: h11.Connection, status: int, headers: list[tuple[str, str]]) -> None:
        headers = [*headers, (GATEWAY_HEADER, self.id)]
        await self._send(stream, conn.send(h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase)))

    async def _answer(self, stream: trio.SocketStream, conn: h11.Connection, status: int, value: Any,
                      extra: Sequence[tuple[str, str]] = ()) -> None:
        body = json.dumps(value).encode()
        await self._head(stream, conn, status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *extra])
        if not self._heads.get(conn):
            await self._send(stream, conn.send(h11.Data(data=body)))
        await self._send(stream, conn.send(h11.EndOfMessage()))

    async def _error(self, stream: trio.SocketStream, conn: h11.Connection, exc: Exception, commit: str | None = None) -> None:
        status, code = 502, ""
        if isinstance(exc, HubAccessError):
            status, code = (exc.status or 404), exc.code
            if not code:
                code = {401: "RepoNotFound", 403: "GatedRepo"}.get(status, "")
        elif isinstance(exc, ConfigError):
            status = 400
        msg = str(exc).replace("\r", " ").replace("\n", " ")[:500]
        extra = [("X-Error-Message", msg.encode("ascii", "replace").decode())]
        if code:
            extra.append(("X-Error-Code", code))
        if commit:
            extra.append(("X-Repo-Commit", commit))
        await self._answer(stream, conn, status, {"error": msg}, extra)

    # -- routes -------------------------------------------------------------
    async def _route(self, stream: trio.SocketStream, conn: h11.Connection, method: str, target: str, headers: dict[str, str]) -> None:
        raw = urllib.parse.urlsplit(target)
        segs = [urllib.parse.unquote(s) for s in raw.path.split("/")[1:]]
        query = dict(urllib.parse.parse_qsl(raw.query))
        if method not in ("GET", "HEAD"):
            await self._answer(stream, conn, 405, {"error": "the gateway is read-only: GET and HEAD"}, [("Allow", "GET, HEAD")])
            return
        try:
            if raw.path == PROBE_PATH:
                await self._answer(stream, conn, 200, {"gateway": "autoglm-node"})
            elif segs[:2] == ["api", "models"] and len(segs) >= 4:
                await self._api(stream, conn, segs[2:], query)
            elif len(segs) >= 5 and segs[2] == "resolve" and segs[0] not in ("api", "datasets", "spaces"):
                await self._resolve(stream, conn, method, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), headers)
            elif segs[:1] in (["datasets"], ["spaces"]) or segs[1:2] in (["datasets"], ["spaces"]):
                await self._error(stream, conn, HubAccessError("the gateway serves models only", 404, "RepoNotFound"))
            else:
                await self._answer(stream, conn, 404, {"error": "not found"})
        except AutoglmError as exc:
            if conn.our_state is h11.SEND_RESPONSE:
                await self._error(stream, conn, exc)
            else:
                raise _Abort(str(exc)) from exc

    async def _api(self, stream: trio.SocketStream, conn: h11.Connection, segs: list[str], query: dict[str, str]) -> None:
        repo = f"{segs[0]}/{segs[1]}"
        rest = segs[2:]
        if not rest:
            rest = ["revision", "main"]
        if rest[0] not in ("revision", "tree") or len(rest) < 2:
            await self._answer(stream, conn, 404, {"error": "not found"})
            return
        snap = await self.snapshot(repo, rest[1])
        if rest[0] == "revision":
            await self._answer(stream, conn, 200, {
                "_id": snap.commit[:24], "id": repo, "modelId": repo, "sha": snap.commit, "private": False, "gated": False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "siblings": [{"rfilename": f.path} for f in snap.files],
            }, [("X-Repo-Commit", snap.commit)])
            return
        prefix = "/".join(rest[2:]).strip("/")
        recursive = query.get("recursive", "false").lower() in ("true", "1")
        await self._answer(stream, conn, 200, _tree(snap.files, prefix, recursive), [("X-Repo-Commit", snap.commit)])

    async def _resolve(self, stream: trio.SocketStream, conn: h11.Connection, method: str, repo: str, rev: str, path: str,
                       headers: dict[str, str]) -> None:
        snap = await self.snapshot(repo, rev)
        f = next((x for x in snap.files if x.path == path), None)
        if f is None:
            await self._error(stream, conn, HubAccessError(f"{path} is not in {repo}@{snap.commit[:12]}", 404, "EntryNotFound"), snap.commit)
            return
        etag = f'"{f.etag}"'
        base = [("X-Repo-Commit", snap.commit), ("ETag", etag), ("Accept-Ranges", "bytes"),
                ("Content-Type", "application/octet-stream"), ("Cache-Control", "private, max-age=0")]
        if f.lfs:
            base += [("X-Linked-Etag", etag), ("X-Linked-Size", str(f.size))]
        start, end, status = 0, f.size, 200
        rng = headers.get("range")
        if rng is not None and headers.get("if-range", etag) == etag and f.size > 0:
            r = _parse_range(rng, f.size)
            if r is None:
                await self._answer(stream, conn, 416, {"error": "range not satisfiable"}, [("Content-Range", f"bytes */{f.size}")])
                return
            if isinstance(r, tuple):  # False: not one well-formed range, ignored (the whole file)
                (start, end), status = r, 206
        out = [*base, ("Content-Length", str(end - start))]
        if status == 206:
            out.append(("Content-Range", f"bytes {start}-{end - 1}/{f.size}"))
        if method == "HEAD":
            await self._head(stream, conn, status, out)
            await self._send(stream, conn.send(h11.EndOfMessage()))
            return
        flight = await self._flight(snap, f)
        # Wait for the first bytes (or the end), so that a failure before any byte is a proper error answer.
        while not (flight.done or flight.error or flight.ready > start or start == end):
            await flight.changed.wait()
        if flight.error is not None:
            await self._error(stream, conn, flight.error, snap.commit)
            return
        await self._head(stream, conn, status, out)
        pos = start
        while pos < end:
            if flight.error is not None:
                raise _Abort(f"{f.path}: {flight.error}")
            avail = min(flight.ready, end)
            if pos >= avail:
                await flight.changed.wait()
                continue
            data = await trio.to_thread.run_sync(flight.read, pos, min(_CHUNK, avail - pos))
            await self._send(stream, conn.send(h11.Data(data=data)))
            pos += len(data)
            self.stats.bytes_served += len(data)
        await self._send(stream, conn.send(h11.EndOfMessage()))

    # -- resolutions and flights --------------------------------------------
    async def snapshot(self, repo: str, rev: str) -> RepoSnapshot:
        """The repository at ``rev``, resolved once for every request that needs it (see the module docstring)."""
        ref = parse_ref(f"hf://{repo}", rev)
        key = (ref.repo, ref.revision)
        now = trio.current_time()
        res = self._resolutions.get(key)
        if res is not None and res.done.is_set():
            ttl = 2.0 if res.error is not None else (float("inf") if _COMMIT.match(rev) else self.config.revision_ttl)
            if now - res.at > ttl:
                res = None
        if res is None:
            if len(self._resolutions) >= _MAX_RESOLUTIONS:  # clients naming endless repos must not grow this forever
                for k in [k for k, r in self._resolutions.items() if r.done.is_set()]:
                    del self._resolutions[k]
            res = self._resolutions[key] = _Resolution()
            assert self._nursery is not None
            self._nursery.start_soon(self._resolve_snapshot, ref, res)
        await res.done.wait()
        if res.error is not None:
            raise res.error
        assert res.snapshot is not None
        return res.snapshot

    async def _resolve_snapshot(self, ref: HubRef, res: _Resolution) -> None:
        try:
            snap = await resolve_snapshot(ref, self.config.endpoints, self.config.token)
            for why in snap.dropped:
                log.warning("gateway: endpoint left out: %s", why)
            repo_dir = repo_folder(self.cache_dir, ref)
            if (ref.repo, snap.commit) not in self._trees:
                await trio.to_thread.run_sync(write_tree, repo_dir, snap.commit, snap.files)
                self._trees.add((ref.repo, snap.commit))
            await trio.to_thread.run_sync(write_ref, repo_dir, ref.revision, snap.commit)
            res.snapshot = snap
            if ref.revision != snap.commit:
                # The commit is now known too: requests pinned to it (snapshot_download's next ones) need no API call.
                pinned = self._resolutions.get((ref.repo, snap.commit))
                if pinned is None or (pinned.done.is_set() and pinned.error is not None):
                    done = _Resolution(snapshot=snap, at=trio.current_time())
                    done.done.set()
                    self._resolutions[(ref.repo, snap.commit)] = done
        except AutoglmError as exc:
            res.error = exc
        except Exception as exc:  # a bug must not hang every waiting client
            log.exception("gateway: resolving %s failed", ref)
            res.error = SourceError(f"resolving {ref} failed: {exc!r}")
        finally:
            res.at = trio.current_time()
            res.done.set()

    async def _flight(self, snap: RepoSnapshot, f: HubFile) -> _Flight:
        key = (snap.ref.repo, f.etag)
        fl = self._flights.get(key)
        if fl is not None:
            if fl.error is not None and trio.current_time() - fl.failed_at > self.config.failure_ttl:
                fl = None
            elif fl.done and not await trio.to_thread.run_sync(fl.blob.is_file):
                fl = None  # removed from the cache since
        if fl is None:
            fl = self._flights[key] = _Flight(repo_folder(self.cache_dir, snap.ref), f, self.config.piece_size)
            self.stats.flights += 1
            assert self._nursery is not None
            self._nursery.start_soon(self._run_flight, snap, f, fl)
        elif fl.done:
            # Another path with the same bytes (one blob): link it as huggingface_hub would.
            await trio.to_thread.run_sync(_link_quietly, fl.repo_dir, snap.commit, [f])
        else:
            fl.also[(snap.commit, f.path)] = f  # linked when the flight is done
        return fl

    def _swarm_source(self, snap: RepoSnapshot) -> None:
        """Seam: the trusted signed manifest covering ``snap`` (``publish hf://``), whose pieces peers serve.

        Not built yet: ``publish hf://`` (issue #10 §2) does not exist, so every flight
        fetches from the hub endpoints. When it does, a flight whose repository and
        commit a trusted manifest covers fetches through the swarm, the endpoints as web seeds.
        """
        return None

    async def _run_flight(self, snap: RepoSnapshot, f: HubFile, fl: _Flight) -> None:
        ref = HubRef(snap.ref.hub, snap.ref.repo, snap.commit)  # pinned: the ref file is the resolution's to write
        plan = HubFetchPlan(ref=ref, endpoints=snap.endpoints, token=self.config.token, cache_dir=self.cache_dir,
                            piece_size=self.config.piece_size, write_tree=False)
        one = RepoSnapshot(ref, snap.commit, (f,), snap.endpoints)
        send, recv = trio.open_memory_channel[Event](256)

        async def follow() -> None:
            async with recv:
                async for ev in recv:
                    fl.on_event(ev)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                async with send:
                    await fetch_hub(self.store, plan, mirror_config=self._mirror_config, options=self._options,
                                    events=send, snapshot=one)
            fl.done = True
            # Every path of the commit with the same bytes (a client that has the blob asks only HEAD for those),
            # and the paths other requests named meanwhile.
            for x in snap.files:
                if x.etag == f.etag and x.path != f.path:
                    fl.also[(snap.commit, x.path)] = x
            for (commit, _), other in list(fl.also.items()):
                await trio.to_thread.run_sync(_link_quietly, fl.repo_dir, commit, [other])
        except Exception as exc:
            err = collapse_group(exc) if isinstance(exc, ExceptionGroup) else exc
            fl.error = err if isinstance(err, Exception) else SourceError(str(err))
            fl.failed_at = trio.current_time()
            self.stats.flights_failed += 1
            what = "does not match the hub's hash" if isinstance(exc, IntegrityError) else "failed"
            log.warning("gateway: %s@%s %s %s: %s", snap.ref.repo, snap.commit[:12], f.path, what, exc)
        finally:
            fl.bump()


async def _close(stream: trio.SocketStream) -> None:
    """Close after what was sent is delivered: half-close, drain what the client still sends (briefly), close.

    Closing with unread bytes in the socket would reset the connection, and the
    client could lose the answer (a 503 or 413) we just sent.
    """
    with trio.move_on_after(1.0):
        try:
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


def _link_quietly(repo_dir: Path, commit: str, files: list[HubFile]) -> None:
    try:
        link_snapshot(repo_dir, commit, files)
    except AutoglmError:
        pass


def _tree(files: Sequence[HubFile], prefix: str, recursive: bool) -> list[dict[str, Any]]:
    """The Hub's tree listing of ``prefix`` (directories first as the Hub lists them, then files)."""
    base = prefix + "/" if prefix else ""
    dirs: dict[str, None] = {}
    out: list[dict[str, Any]] = []
    for f in files:
        if not f.path.startswith(base):
            continue
        rel = f.path[len(base):]
        segs = rel.split("/")
        for k in range(1, len(segs)):
            if not recursive and k > 1:
                break
            dirs.setdefault(base + "/".join(segs[:k]))
        if not recursive and len(segs) > 1:
            continue
        e: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
        if f.lfs:
            e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
        out.append(e)
    import hashlib

    folders = [{"type": "directory", "oid": hashlib.sha1(d.encode(), usedforsecurity=False).hexdigest(), "size": 0, "path": d}
               for d in dirs]
    return folders + out


async def serve_gateway(
    store: Store, config: GatewayConfig, *, task_status: TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a gateway until cancelled; reports the :class:`Gateway` (its ``address`` bound) once listening."""
    gw = Gateway(store, config)

    async with trio.open_nursery() as nursery:
        await nursery.start(gw.serve)
        task_status.started(gw)
