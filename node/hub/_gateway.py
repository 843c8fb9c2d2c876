"""The Hugging Face gateway: an ``HF_ENDPOINT`` served by the node (``join --hf-gateway 127.0.0.1:PORT``).

Unmodified clients (``HF_ENDPOINT=http://127.0.0.1:PORT hf download ORG/REPO``,
``snapshot_download``, ``hf_hub_download``, transformers, vLLM) get their files
through the node: from the swarm when a trusted signed manifest made by
``publish hf://`` covers the repository and commit (``--hf-manifest``, or the
signed name record ``hf:ORG/REPO`` by a trusted key: ``_names``), else
through the node's own hub fetch; verified either way, and stored once, in the
node's Hugging Face cache.

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

The parts: this module routes requests and writes the Hub's answers;
``_gwhttp`` is the HTTP/1.1 server with the per-client budgets; ``_flights``
resolves revisions once and runs one *flight* per file shared by every client
(single-flight), fed by the hub fetch or by ``_swarm_flights`` (the swarm).
A response streams the flight's servable prefix as it grows.

Clients' ``Authorization`` headers are ignored: the gateway reads upstream
with the node's own token, so anyone who reaches it reads what that token can.
It binds 127.0.0.1 by default.

Loops: an upstream endpoint at the gateway's own address is refused before
start; after start, each endpoint is asked ``/api/autoglm-gateway`` and an
answer carrying this gateway's ``X-Autoglm-Gateway`` id (a random value every
response carries) means the upstream is the gateway itself: refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from autoglm.node._mirror_server import _parse_range
from autoglm.node._mirrors import USER_AGENT
from autoglm.node._progress import Event
from autoglm.node._store import Store
from autoglm.node.errors import AutoglmError, ConfigError, SourceError
from autoglm.protocol import TrustPolicy

from ._api import HubAccessError, HubFile
from ._cache import hub_cache_dir
from ._fetch import PIECE_SIZE
from ._flights import Flights, FlightSettings
from ._gwhttp import Abort, ClientBudgets, ClientStats, HttpServer, Reply
from ._names import NameCovers, NameSource
from ._swarm_flights import Fleet, Hold, HubManifest, SwarmFlights

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = ["GATEWAY_HEADER", "Gateway", "GatewayConfig", "GatewayStats", "check_upstreams", "parse_hostport", "serve_gateway"]

log = logging.getLogger(__name__)

GATEWAY_HEADER = "X-Autoglm-Gateway"
PROBE_PATH = "/api/autoglm-gateway"
_CHUNK = 16 << 20  # bytes per sendfile span (the flight's state is checked between spans)
# Keeping a waiting client's read alive: huggingface_hub gives up on a read after
# HF_HUB_DOWNLOAD_TIMEOUT (10 s) without a byte, sleeps 1 s and asks again with Range,
# five times at most. A streamed file's prefix can stand still longer than that (its
# next piece comes from a slow owner, or the machine is busy). So while a flight is
# under way, the last _RESERVE verified bytes of what a response may send are held
# back, and after _DRIP_AFTER seconds without new bytes _DRIP of them go out: the
# client's read never waits 10 s while the reserve lasts (32 drips: over 2 minutes).
# Only verified bytes are ever sent; the reserve costs the client nothing it could use
# sooner but those 2 MiB, sent when the next piece arrives.
_RESERVE = 2 << 20
_DRIP = 64 << 10
_DRIP_AFTER = 4.0
_HEAD_WAIT = 4.0  # the status line goes out after this long without a first byte (its own read timeout)
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
    manifests: tuple[HubManifest, ...] = ()  # trusted publish hf:// manifests: their commits come from the swarm
    trust: TrustPolicy | None = None  # the node's trust, for those manifests' swarm fetches and the name records
    name_ttl: float = 30.0  # a name record lookup (found or not) is reused this long
    name_wait: float = 3.0  # a flight waits at most this long for a running lookup, then goes to the hub
    name_timeout: float = 30.0  # a lookup is given up after this long (an answer "none")


@dataclass(slots=True)
class GatewayStats(ClientStats):
    flights: int = 0
    flights_failed: int = 0
    bytes_served: int = 0
    drips: int = 0  # small sends from the held-back reserve to a client whose stream stood still (_DRIP_AFTER)
    served_by_via: dict[str, int] = field(default_factory=lambda: {"hub": 0, "swarm": 0})


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


class Gateway:
    """Routes and answers; the flights and the HTTP budgets are its parts. Run with :meth:`serve`.

    ``hold`` is the node's swarm fetch (``SwarmNode.hold``), needed for ``config.manifests``;
    ``names`` the node's name records (the ``SwarmNode``): with ``hold`` and trusted keys, the
    record ``hf:ORG/REPO`` finds covering manifests too; ``on_event`` gets the hub flights'
    engine events (the node's metrics); ``fleet`` says how many peers in session hold a manifest
    (an armed swarm hold waits a little for them: ``_swarm_flights``).
    """

    def __init__(self, store: Store, config: GatewayConfig, *, hold: Hold | None = None, names: NameSource | None = None,
                 on_event: Callable[[str, Event], None] | None = None, fleet: Fleet | None = None) -> None:
        self.store = store
        self.config = config
        self.cache_dir = config.cache_dir or hub_cache_dir()
        self.id = secrets.token_hex(16)
        self.stats = GatewayStats()
        self.address: tuple[str, int] = (config.host, config.port)
        self.flights: Flights | None = None
        self._hold = hold
        self._fleet = fleet
        self._names = names
        self.name_covers: NameCovers | None = None
        self._on_event = on_event
        budgets = ClientBudgets(config.max_clients, config.header_timeout, config.idle_timeout, config.send_timeout)
        self._http = HttpServer(self._route, budgets, self.stats, always=[(GATEWAY_HEADER, self.id)])

    # -- serving ------------------------------------------------------------
    async def serve(self, *, task_status: TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; reports the bound (host, port). ConfigError if an upstream is this gateway."""
        cfg = self.config
        if cfg.manifests and self._hold is None:
            raise ConfigError("the gateway's --hf-manifest needs the swarm node (join) to fetch from peers")
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
            self.flights = Flights(self.store, FlightSettings(cfg.endpoints, cfg.token, self.cache_dir, cfg.piece_size,
                                                              cfg.revision_ttl, cfg.failure_ttl),
                                   nursery, on_event=self._on_event)
            trust = cfg.trust or TrustPolicy()
            if self._names is not None and self._hold is not None and trust.keys:
                self.name_covers = NameCovers(self._names, trust, nursery, ttl=cfg.name_ttl, wait=cfg.name_wait,
                                              timeout=cfg.name_timeout)
            if (cfg.manifests or self.name_covers is not None) and self._hold is not None:
                self.flights.swarm = SwarmFlights(cfg.manifests, self._hold, cache_dir=self.cache_dir,
                                                  trust=trust, endpoints=cfg.endpoints, token=cfg.token, nursery=nursery,
                                                  fall_back=self.flights.fall_back, names=self.name_covers,
                                                  fleet=self._fleet)
            await nursery.start(trio.serve_listeners, self._http.client, listeners)
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

    async def _error(self, reply: Reply, exc: Exception, commit: str | None = None) -> None:
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
        await reply.answer(status, {"error": msg}, extra)

    # -- routes -------------------------------------------------------------
    async def _route(self, reply: Reply, method: str, target: str, headers: dict[str, str]) -> None:
        raw = urllib.parse.urlsplit(target)
        segs = [urllib.parse.unquote(s) for s in raw.path.split("/")[1:]]
        query = dict(urllib.parse.parse_qsl(raw.query))
        if method not in ("GET", "HEAD"):
            await reply.answer(405, {"error": "the gateway is read-only: GET and HEAD"}, [("Allow", "GET, HEAD")])
            return
        try:
            if raw.path == PROBE_PATH:
                await reply.answer(200, {"gateway": "autoglm-node"})
            elif segs[:2] == ["api", "models"] and len(segs) >= 4:
                await self._api(reply, segs[2:], query)
            elif len(segs) >= 5 and segs[2] == "resolve" and segs[0] not in ("api", "datasets", "spaces"):
                await self._resolve(reply, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), headers)
            elif segs[:1] in (["datasets"], ["spaces"]) or segs[1:2] in (["datasets"], ["spaces"]):
                await self._error(reply, HubAccessError("the gateway serves models only", 404, "RepoNotFound"))
            else:
                await reply.answer(404, {"error": "not found"})
        except AutoglmError as exc:
            if reply.started:
                raise Abort(str(exc)) from exc
            await self._error(reply, exc)

    async def _api(self, reply: Reply, segs: list[str], query: dict[str, str]) -> None:
        assert self.flights is not None
        repo = f"{segs[0]}/{segs[1]}"
        rest = segs[2:] or ["revision", "main"]
        if rest[0] not in ("revision", "tree") or len(rest) < 2:
            await reply.answer(404, {"error": "not found"})
            return
        snap = await self.flights.snapshot(repo, rest[1])
        prefix = "/".join(rest[2:]).strip("/")
        recursive = query.get("recursive", "false").lower() in ("true", "1")
        if self.flights.swarm is not None and (rest[0] == "revision" or (recursive and not prefix)):
            # snapshot_download's first call (model info; the whole tree when it names a commit): its file
            # requests follow, so a covering manifest's hold starts now (armed: _swarm_flights)
            self.flights.swarm.arm(snap)
        if rest[0] == "revision":
            await reply.answer(200, {
                "_id": snap.commit[:24], "id": repo, "modelId": repo, "sha": snap.commit, "private": False, "gated": False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "siblings": [{"rfilename": f.path} for f in snap.files],
            }, [("X-Repo-Commit", snap.commit)])
            return
        await reply.answer(200, _tree(snap.files, prefix, recursive), [("X-Repo-Commit", snap.commit)])

    async def _resolve(self, reply: Reply, repo: str, rev: str, path: str, headers: dict[str, str]) -> None:
        assert self.flights is not None
        snap = await self.flights.snapshot(repo, rev)
        f = next((x for x in snap.files if x.path == path), None)
        if f is None:
            await self._error(reply, HubAccessError(f"{path} is not in {repo}@{snap.commit[:12]}", 404, "EntryNotFound"), snap.commit)
            return
        etag = f'"{f.etag}"'
        out = [("X-Repo-Commit", snap.commit), ("ETag", etag), ("Accept-Ranges", "bytes"),
               ("Content-Type", "application/octet-stream"), ("Cache-Control", "private, max-age=0")]
        if f.lfs:
            out += [("X-Linked-Etag", etag), ("X-Linked-Size", str(f.size))]
        start, end, status = 0, f.size, 200
        rng = headers.get("range")
        if rng is not None and headers.get("if-range", etag) == etag and f.size > 0:
            r = _parse_range(rng, f.size)
            if r is None:
                await reply.answer(416, {"error": "range not satisfiable"}, [("Content-Range", f"bytes */{f.size}")])
                return
            if isinstance(r, tuple):  # False: not one well-formed range, ignored (the whole file)
                (start, end), status = r, 206
        out.append(("Content-Length", str(end - start)))
        if status == 206:
            out.append(("Content-Range", f"bytes {start}-{end - 1}/{f.size}"))
        if reply.head_only:
            if self.flights.swarm is not None:
                self.flights.swarm.expect(snap, f)
            await reply.head(status, out)
            await reply.end()
            return
        t0 = trio.current_time()
        fl = await self.flights.flight(snap, f)
        self.stats.flights, self.stats.flights_failed = self.flights.started, self.flights.failed
        # Wait for the first bytes (or the end), so that a failure before any byte is a proper error
        # answer; but not past the client's own read timeout (the body's reads get the drip below).
        with trio.move_on_after(_HEAD_WAIT):
            while not (fl.done or fl.error or fl.ready > start or start == end):
                await fl.changed.wait()
        if fl.error is not None:
            await self._error(reply, fl.error, snap.commit)
            return
        await reply.head(status, out)
        pos = start
        fd = -1
        drips = 0
        waited = 0.0  # seconds this response had sent all it could and waited for the next verified bytes
        try:
            while pos < end:
                if fl.error is not None:
                    raise Abort(f"{f.path}: {fl.error}")
                ready = min(fl.ready, end)
                avail = ready if fl.done or ready >= end else ready - _RESERVE
                if pos >= avail:
                    changed = fl.changed
                    w0 = trio.current_time()
                    with trio.move_on_after(_DRIP_AFTER):
                        await changed.wait()
                    waited += trio.current_time() - w0
                    if changed.is_set() or pos >= min(fl.ready, end):
                        continue
                    n = min(_DRIP, min(fl.ready, end) - pos)  # still nothing new: a little of the reserve
                    drips += 1
                else:
                    n = min(_CHUNK, avail - pos)
                if fd < 0:
                    try:
                        fd = await trio.to_thread.run_sync(fl.open)
                    except OSError as exc:
                        raise Abort(f"{f.path}: {exc}") from exc
                await reply.file(fd, pos, n)
                pos += n
                self.stats.bytes_served += n
                self.stats.served_by_via[fl.via] = self.stats.served_by_via.get(fl.via, 0) + n
        finally:
            if fd >= 0:
                os.close(fd)
            self.stats.drips += drips
        await reply.end()
        self.stats.flights_failed = self.flights.failed
        log.info("gateway: served %s@%s %s bytes %d-%d in %.2f s (%s; %.2f s of it waiting for verified bytes%s)", repo,
                 snap.commit[:12], f.path, start, end, trio.current_time() - t0, fl.via, waited,
                 f", {drips} drip(s) while its stream stood still" if drips else "")


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
    folders = [{"type": "directory", "oid": hashlib.sha1(d.encode(), usedforsecurity=False).hexdigest(), "size": 0, "path": d}
               for d in dirs]
    return folders + out


async def serve_gateway(
    store: Store, config: GatewayConfig, *, hold: Hold | None = None, names: NameSource | None = None,
    on_event: Callable[[str, Event], None] | None = None, fleet: Fleet | None = None,
    task_status: TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a gateway until cancelled; reports the :class:`Gateway` (its ``address`` bound) once listening."""
    gw = Gateway(store, config, hold=hold, names=names, on_event=on_event, fleet=fleet)

    async with trio.open_nursery() as nursery:
        await nursery.start(gw.serve)
        task_status.started(gw)
