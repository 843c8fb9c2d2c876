"""Prometheus metrics, ``/healthz`` and ``/livez`` for a running ``join`` node.

Strategy: no global state and no calls sprinkled through the swarm. Each node
gets its own :class:`CollectorRegistry` with two kinds of metrics:

* counters fed from the engine's event stream (:meth:`NodeMetrics.observe`,
  called once per event by the swarm node's pump: the same events the CLI
  renders), labelled by source *kind* (peer, mirror, hub, local) and model;
* a collector that reads the node's live state at scrape time (peers, DHT
  size, swarm byte counters, bans, mirror scores, store bytes, free disk).

Label cardinality is bounded: models and mirrors are few, and no label ever
carries a peer id. A mirror's label is its URL without userinfo, query or
fragment, so a token in a mirror URL never reaches a scrape.

The listener is a small HTTP/1.1 server on trio + h11, bound to 127.0.0.1
unless the operator names another address; each connection has a deadline and
a size limit, and at most a few are served at once.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import h11
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from autoglm.node._progress import (
    Event,
    FetchDone,
    FetchStarted,
    FileDone,
    PieceVerified,
    SourceFailed,
)

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from autoglm.node._swarm_node import SwarmNode

__all__ = [
    "CONTENT_TYPE",
    "HealthConfig",
    "NodeMetrics",
    "health",
    "mirror_label",
    "parse_hostport",
    "serve_metrics",
    "source_kind",
    "watch_gateway",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_KINDS = ("peer", "mirror", "hub", "local")
_REASONS = ("integrity", "permanent", "transient")
_VERDICTS = {"ok": "ok", "reject": "refused", "error": "error"}  # gate status -> verdict label
_MAX_CONNECTIONS = 8
_CONN_DEADLINE = 10.0
_MAX_REQUEST_HEAD = 16 * 1024


def source_kind(source_id: str) -> str:
    """``peer:Qm..`` -> ``peer``; anything unknown is ``other`` (bounded label values)."""
    kind = source_id.split(":", 1)[0]
    return kind if kind in _KINDS else "other"


def mirror_label(url: str) -> str:
    """A mirror URL safe to show: scheme, host, port and path only (no userinfo, query, fragment)."""
    parts = urlsplit(url.removeprefix("mirror:"))
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def parse_hostport(value: str, what: str = "--metrics") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); a bare ``PORT`` means 127.0.0.1."""
    from autoglm.node.errors import ConfigError

    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} {value!r} is not HOST:PORT")
    return host, int(port)


# -- health ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """When the node calls itself degraded (docs/operations.md, Health)."""

    min_free_bytes: int = 1 << 30  # disk nearly full: less than this free...
    min_free_ratio: float = 0.02  # ...or less than this fraction of the file system


def health(node: SwarmNode, config: HealthConfig | None = None) -> dict[str, Any]:
    """``{"status": "ready"|"degraded", "reasons": [...]}`` from the node's live state."""
    c = config or HealthConfig()
    reasons: list[str] = []
    peers = len(node.swarm.sessions)
    mirrors = node.mirror_urls
    # A configured mirror counts as reachable until its score says otherwise.
    reachable = [u for u in mirrors if not (u in node.mirrors and node.mirrors[u].score.degraded)]
    if peers == 0 and not reachable:
        reasons.append("no peers and no reachable mirror" if mirrors else "no peers and no mirror configured")
    if node.p2p.dht_size() == 0:
        reasons.append("DHT routing table empty")
    du = shutil.disk_usage(node.config.data_dir)
    if du.free < c.min_free_bytes or du.free < c.min_free_ratio * du.total:
        reasons.append(f"disk nearly full: {du.free} bytes free of {du.total} in {node.config.data_dir}")
    return {"status": "degraded" if reasons else "ready", "reasons": reasons, "peers": peers,
            "dht_size": node.p2p.dht_size(), "mirrors_reachable": len(reachable), "disk_free_bytes": du.free}


# -- metrics --------------------------------------------------------------------


class _LiveCollector(Collector):
    """Reads the node at scrape time: nothing to keep in step, nothing stale."""

    def __init__(self, node: SwarmNode) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        n = self._node
        stats = n.swarm.stats
        yield GaugeMetricFamily("autoglm_peers_connected", "Peers with an open swarm session", len(n.swarm.sessions))
        yield GaugeMetricFamily("autoglm_dht_routing_table_peers", "Peers in the DHT routing table", n.p2p.dht_size())
        yield CounterMetricFamily("autoglm_peer_sent_bytes", "Piece bytes uploaded to peers", stats.up_bytes)
        yield CounterMetricFamily("autoglm_peer_received_bytes", "Piece bytes received from peers (the swarm's count)",
                                  stats.down_bytes)
        yield CounterMetricFamily("autoglm_peer_bad_pieces", "Pieces from peers that failed their hash", stats.bad_pieces)
        yield CounterMetricFamily("autoglm_peer_bans", "Peers banned (per manifest) for bad data", len(stats.banned))
        yield CounterMetricFamily("autoglm_peer_lost_pieces", "Pieces a peer advertised and then could not serve",
                                  stats.lost_pieces)
        waits = CounterMetricFamily("autoglm_ratelimit_waits", "Transfers that waited for the rate limit",
                                    labels=["direction"])
        waited = CounterMetricFamily("autoglm_ratelimit_wait_seconds", "Time transfers waited for the rate limit",
                                     labels=["direction"])
        for direction, limiter in (("up", n.swarm.up), ("down", n.swarm.down)):
            waits.add_metric([direction], limiter.waits)
            waited.add_metric([direction], limiter.waited_seconds)
        yield waits
        yield waited
        yield from self._mirrors()
        yield from self._store()

    def _mirrors(self) -> Iterator[Metric]:
        rtt = GaugeMetricFamily("autoglm_mirror_rtt_seconds", "Smoothed time to first response byte", labels=["mirror"])
        score = GaugeMetricFamily("autoglm_mirror_score", "Mirror score (throughput discounted by errors and RTT)",
                                  labels=["mirror"])
        errors = CounterMetricFamily("autoglm_mirror_errors", "Failed mirror requests", labels=["mirror"])
        degraded = GaugeMetricFamily("autoglm_mirror_degraded", "1 while the mirror is degraded (slow or failing)",
                                     labels=["mirror"])
        for url, src in self._node.mirrors.items():
            label = [mirror_label(url)]
            rtt.add_metric(label, src.score.rtt or 0.0)
            score.add_metric(label, src.score.value)
            errors.add_metric(label, src.score.errors)
            degraded.add_metric(label, 1.0 if src.score.degraded else 0.0)
        yield from (rtt, score, errors, degraded)

    def _store(self) -> Iterator[Metric]:
        held = GaugeMetricFamily("autoglm_store_verified_bytes", "Verified bytes held, per model", labels=["model"])
        total = GaugeMetricFamily("autoglm_model_size_bytes", "Size of each held model", labels=["model"])
        for p in self._node.progress.values():
            held.add_metric([f"{p.name}@{p.version}"], p.bytes_done)
            total.add_metric([f"{p.name}@{p.version}"], p.bytes_total)
        yield held
        yield total
        du = shutil.disk_usage(self._node.config.data_dir)
        yield GaugeMetricFamily("autoglm_disk_free_bytes", "Free bytes on the data directory's file system", du.free)
        yield GaugeMetricFamily("autoglm_disk_total_bytes", "Size of the data directory's file system", du.total)
        ready = health(self._node)["status"] == "ready"
        yield GaugeMetricFamily("autoglm_ready", "1 when /healthz answers ready, 0 when degraded", 1.0 if ready else 0.0)


class _GatewayCollector(Collector):
    """``join --hf-gateway``: bytes served to clients, by where the flight's bytes came from; requests; clients."""

    def __init__(self, stats: Any) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        served = CounterMetricFamily("autoglm_gateway_served_bytes", "File bytes the gateway sent to its clients, "
                                     "by where the node got them (hub: its hub fetch; swarm: a trusted manifest)",
                                     labels=["via"])
        for via, n in sorted(s.served_by_via.items()):
            served.add_metric([via], n)
        yield served
        yield CounterMetricFamily("autoglm_gateway_requests", "HTTP requests to the gateway", s.requests)
        yield CounterMetricFamily("autoglm_gateway_flights", "Files fetched for gateway clients (one per blob)", s.flights)
        yield CounterMetricFamily("autoglm_gateway_flights_failed", "Gateway file fetches that failed", s.flights_failed)
        yield GaugeMetricFamily("autoglm_gateway_clients", "Open gateway client connections", s.clients)
        yield CounterMetricFamily("autoglm_gateway_refused_clients", "Clients refused over the connection budget",
                                  s.refused_clients)


def watch_gateway(metrics: NodeMetrics, stats: Any) -> None:
    """Add the Hugging Face gateway's counters (``hub._gateway.GatewayStats``, read at scrape time) to ``metrics``."""
    metrics.registry.register(_GatewayCollector(stats))


class NodeMetrics:
    """One node's registry: event-fed counters plus the live collector."""

    def __init__(self, node: SwarmNode) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.fetched = Counter("autoglm_fetched_bytes", "Verified piece bytes fetched, by source kind and model",
                               ["source", "model"], registry=r)
        self.pieces = Counter("autoglm_pieces_verified", "Pieces that matched their hash and are durable",
                              ["source", "model"], registry=r)
        self.failed = Counter("autoglm_source_failures", "Failed requests to a source",
                              ["source", "model", "reason"], registry=r)
        self.files = Counter("autoglm_files_done", "Files completed and verified", ["model"], registry=r)
        self.fetches = Counter("autoglm_fetches_done", "Fetches completed", ["model"], registry=r)
        self.refetched = Counter("autoglm_refetched_bytes", "Bytes fetched again after a failure", ["model"], registry=r)
        self.seconds = Histogram("autoglm_fetch_duration_seconds", "Wall time of completed fetches", ["model"],
                                 buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600), registry=r)
        self.lookup = Histogram("autoglm_dht_lookup_duration_seconds", "DHT provider lookups, until answer or timeout",
                                buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        # The sandbox gate's verdicts on held files (`join --verify`): file kind x outcome, both small sets.
        self.verdicts = Counter("autoglm_sandbox_verdicts", "Sandbox gate verdicts on held files, by file kind and outcome",
                                ["kind", "verdict"], registry=r)
        for verdict in _VERDICTS.values():
            self.verdicts.labels("safetensors", verdict)
        node.p2p.on_lookup = self.lookup.observe
        r.register(_LiveCollector(node))

    def observe(self, model: str, ev: Event, as_kind: str | None = None) -> None:
        """Count one engine event of ``model`` (``name@version``); ``as_kind`` overrides the source kind (the gateway's "hub")."""
        if isinstance(ev, FetchStarted):
            # Every series of the model exists from its start (at 0), so rate() and alerts see the first failure.
            for kind in _KINDS:
                self.fetched.labels(kind, model)
                self.pieces.labels(kind, model)
                for reason in _REASONS:
                    self.failed.labels(kind, model, reason)
            self.files.labels(model)
            self.fetches.labels(model)
            self.refetched.labels(model)
        elif isinstance(ev, PieceVerified):
            kind = as_kind or source_kind(ev.source_id)
            self.fetched.labels(kind, model).inc(ev.nbytes)
            self.pieces.labels(kind, model).inc()
        elif isinstance(ev, SourceFailed):
            reason = "integrity" if ev.integrity else "permanent" if ev.permanent else "transient"
            self.failed.labels(as_kind or source_kind(ev.source_id), model, reason).inc()
        elif isinstance(ev, FileDone):
            self.files.labels(model).inc()
        elif isinstance(ev, FetchDone):
            self.fetches.labels(model).inc()
            self.refetched.labels(model).inc(ev.refetched_bytes)
            self.seconds.labels(model).observe(ev.seconds)

    def observe_verdict(self, kind: str, status: str) -> None:
        """Count one sandbox verdict (``status``: the gate's ok / reject / error)."""
        self.verdicts.labels(kind, _VERDICTS.get(status, "error")).inc()

    def scrape(self) -> bytes:
        return generate_latest(self.registry)


# -- the listener ---------------------------------------------------------------


def _routes(node: SwarmNode, metrics: NodeMetrics) -> dict[str, Callable[[], tuple[int, str, bytes]]]:
    def healthz() -> tuple[int, str, bytes]:
        h = health(node)
        return (200 if h["status"] == "ready" else 503), "application/json", json.dumps(h).encode() + b"\n"

    return {
        "/metrics": lambda: (200, CONTENT_TYPE, metrics.scrape()),
        "/healthz": healthz,
        "/livez": lambda: (200, "text/plain", b"ok\n"),
    }


async def _serve_one(stream: trio.SocketStream, routes: dict[str, Callable[[], tuple[int, str, bytes]]]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_HEAD)
    with trio.move_on_after(_CONN_DEADLINE):
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await stream.receive_some(4096)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if not isinstance(ev, h11.Request):
                return
            path = ev.target.decode("ascii", "replace").split("?", 1)[0]
            route = routes.get(path)
            if ev.method not in (b"GET", b"HEAD"):
                status, ctype, body = 405, "text/plain", b"only GET\n"
            elif route is None:
                status, ctype, body = 404, "text/plain", b"not found: /metrics, /healthz, /livez\n"
            else:
                status, ctype, body = route()
            headers = [("content-type", ctype), ("content-length", str(len(body))), ("connection", "close")]
            out = conn.send(h11.Response(status_code=status, headers=headers))
            if ev.method == b"GET":
                out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
            out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
            await stream.send_all(out)
            return


async def serve_metrics(
    node: SwarmNode,
    metrics: NodeMetrics,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/livez`` on HOST:PORT; ``started`` gets the bound address."""
    routes = _routes(node, metrics)
    limit = trio.CapacityLimiter(_MAX_CONNECTIONS)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()

    async def handler(stream: trio.SocketStream) -> None:
        async with limit, stream:
            try:
                await _serve_one(stream, routes)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
                log.debug("metrics client went away: %r", exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, listeners)
        log.info("metrics on http://%s:%d/metrics", bound[0], bound[1])
        task_status.started((str(bound[0]), int(bound[1])))

