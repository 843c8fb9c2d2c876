"""join (run a long-lived swarm node) and status (ask a running one)."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoglm.node._config import configured_bootstrap
from autoglm.node.errors import AutoglmError, ConfigError

from ._common import console, err_console, human_bytes, print_json
from ._manifest_cmds import add_trust_args, parse_size, trust_from_args

__all__ = ["register"]

if TYPE_CHECKING:
    from autoglm.node._swarm_node import SwarmNode
    from autoglm.node.swarm import SwarmEvent

# libp2p takes about half a second to import: the swarm modules load only
# when `join` runs, so every other command starts fast.
DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"
SHUTDOWN_GRACE = 5.0  # seconds SIGTERM gives running fetches before the node stops

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "join",
        help="run a swarm node: join the DHT, serve verified pieces, fetch what --seed asks for",
        description="With no --bootstrap this is the first node of a new network; the first line "
        "printed is the multiaddr others join with. Stop with Ctrl-C or SIGTERM.",
    )
    p.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR", help="a peer to join through (repeatable)")
    p.add_argument("--mirror", action="append", default=[], metavar="URL", help="HTTP mirror for pieces no peer has (repeatable)")
    p.add_argument("--seed", action="append", default=[], metavar="MANIFEST",
                   help="hold this manifest (path or URL): fetch what is missing, then serve it (repeatable)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where --seed models go (default DATA_DIR/models); with several seeds, DIR/NAME@VERSION")
    p.add_argument("--listen", action="append", default=[], metavar="MULTIADDR", help=f"libp2p listen address (default {DEFAULT_LISTEN})")
    p.add_argument("--peerwire", default="127.0.0.1:0", metavar="HOST:PORT", help="bulk piece transport address (default 127.0.0.1:0)")
    p.add_argument("--relay", action="store_true",
                   help="relay circuits for peers behind NAT, within a per-peer budget (docs/nat.md, docs/security.md)")
    p.add_argument("--upload-slots", type=int, default=8, metavar="N", help="peers served at once (default 8)")
    p.add_argument("--up-rate", type=parse_size, metavar="BYTES/S", help="global upload limit, e.g. 50MiB")
    p.add_argument("--down-rate", type=parse_size, metavar="BYTES/S", help="global download limit from peers")
    p.add_argument("--swarm-key", type=Path, metavar="FILE",
                   help="private swarm: a file with 64 hex characters (openssl rand -hex 32); "
                   "piece transfers are then sealed with ChaCha20-Poly1305 and need the same key")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus /metrics, /healthz and /livez here (e.g. 127.0.0.1:9464; keep it on loopback)")
    p.add_argument("--verify", action="store_true",
                   help="run the sandbox gate (as `verify` does) on each --seed model once it is complete; "
                   "verdicts are printed and counted in autoglm_sandbox_verdicts_total")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout")
    g = p.add_argument_group("Hugging Face gateway (docs/huggingface.md)")
    g.add_argument("--hf-gateway", metavar="HOST:PORT",
                   help="serve an HF_ENDPOINT for unmodified clients (huggingface_hub, hf download) at this address, e.g. 127.0.0.1:8080")
    g.add_argument("--hf-manifest", action="append", default=[], type=Path, metavar="PATH",
                   help="a trusted manifest made by publish hf:// (its .hub.json beside it), or a folder of them: "
                   "the gateway takes the files of those commits from the swarm, the Hub as web seed (repeatable)")
    g.add_argument("--endpoint", action="append", default=[], metavar="URL",
                   help="the gateway's upstream besides HF_ENDPOINT or the public hub (repeatable; all must agree)")
    g.add_argument("--token-file", type=Path, metavar="FILE",
                   help="the gateway's upstream token (default: HF_TOKEN, then huggingface_hub's stored token)")
    g = p.add_argument_group("following a name (docs/operations.md: update and rollback)")
    g.add_argument("--follow", action="append", default=[], metavar="NAME",
                   help="keep DATA_DIR/models/NAME/current on NAME's newest signed version (repeatable)")
    g.add_argument("--follow-keep", type=int, default=2, metavar="K", help="earlier versions kept for rollback (default 2)")
    g.add_argument("--follow-interval", type=float, default=60.0, metavar="SECONDS",
                   help="longest wait between two DHT polls (backoff from 5 s; default 60); a push from a peer is at once")
    from ._update_cmds import add_hf_cache_args

    add_hf_cache_args(g, "each followed version")
    add_trust_args(p)
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("status", help="show a running node's peers, DHT size, models, rates and bytes by source")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("name-publish", help="point the manifest's NAME at it in the DHT (signed name record), via a running node")
    p.add_argument("manifest", type=Path, metavar="MANIFEST")
    p.add_argument("--key", type=Path, required=True, metavar="KEYFILE", help="the publisher key that signed MANIFEST")
    p.add_argument("--seq", type=int, metavar="N", help="sequence number (default: the manifest's created_at)")
    p.add_argument("--rollout", type=float, metavar="PERCENT",
                   help="staged roll-out: only this share of `join --follow` nodes take it now (default 100)")
    p.add_argument("--preheat", type=Path, metavar="DIR",
                   help="first fetch the version into DIR on the running node (peers, then --mirror), so the "
                   "followers find every changed piece at a peer and the origin serves one copy")
    p.add_argument("--mirror", action="append", default=[], metavar="URL", help="with --preheat: the mirror (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_name_publish)


def _out_for(args: argparse.Namespace, index: int) -> Path:
    base: Path = args.out or args.data_dir / "models"
    return base if len(args.seed) == 1 else base / f"seed-{index}"


def _say(args: argparse.Namespace, event: str, text: str, **fields: Any) -> None:
    if args.json:
        print_json({"event": event, **fields})
    else:
        console.print(text, soft_wrap=True)


async def _seed(node: SwarmNode, args: argparse.Namespace, index: int, manifest: str) -> None:
    import trio

    from autoglm.node._plan import FetchPlan
    from autoglm.node._progress import FetchStarted, ProgressSnapshot, SourceFailed

    send, recv = trio.open_memory_channel[Any](64)
    async with trio.open_nursery() as nursery:

        async def show() -> None:
            async with recv:
                async for ev in recv:
                    if isinstance(ev, FetchStarted):
                        _say(args, "fetch-started", f"fetching {ev.name} {ev.version} into {ev.out_dir}",
                             manifest_id=ev.manifest_id, out_dir=ev.out_dir, bytes_total=ev.bytes_total)
                    elif isinstance(ev, ProgressSnapshot) and args.json:
                        print_json({"event": "progress", "seed": index, "bytes_done": ev.bytes_done,
                                    "bytes_total": ev.bytes_total, "rate": round(ev.rate)})
                    elif isinstance(ev, SourceFailed) and ev.integrity:
                        _say(args, "bad-piece", f"[red]{ev.source_id} sent a bad piece[/]", source_id=ev.source_id)

        nursery.start_soon(show)
        try:
            # publish hf://: the Hub endpoints named in the signed provenance are web seeds
            from autoglm.node.hub._publish import with_sidecar_mirrors

            mirrors = await trio.to_thread.run_sync(with_sidecar_mirrors, manifest, tuple(args.mirror))
            plan = FetchPlan(manifest, _out_for(args, index), trust_from_args(args), mirrors=mirrors)
            result = await node.hold(plan, events=send)
        except AutoglmError as exc:
            _say(args, "seed-failed", f"[red]cannot hold {manifest}:[/] {exc}", manifest=manifest, message=str(exc))
            return
        except Exception as exc:  # the per-seed supervisor: the node keeps serving the others
            log.exception("holding %s failed", manifest)
            _say(args, "seed-failed", f"[red]cannot hold {manifest}:[/] {exc!r}", manifest=manifest, message=repr(exc))
            return
    _say(args, "complete", f"verified {result.out_dir} ({human_bytes(result.bytes_total)} in {result.seconds:.1f}s); serving it",
         manifest_id=result.manifest_id.hex(), out_dir=result.out_dir, bytes_total=result.bytes_total,
         bytes_by_source=result.bytes_by_source, seconds=round(result.seconds, 3))
    if args.verify:
        await _gate(node, args, Path(result.out_dir))


async def _gate(node: SwarmNode, args: argparse.Namespace, out_dir: Path) -> None:
    """The sandbox gate over a held model, off the event loop; each verdict counted in the node's metrics."""
    import trio

    from autoglm.node._gate import VerdictCache, verify_tree

    cache = VerdictCache.in_data_dir(args.data_dir)
    try:
        results = await trio.to_thread.run_sync(lambda: verify_tree(out_dir, cache=cache))
    finally:
        cache.close()
    refused = [(p, v) for p, v in results if v.status != "ok"]
    if node.metrics is not None:
        for _, v in results:
            node.metrics.observe_verdict(v.kind, v.status)
    for path, v in refused:
        log.warning("sandbox refused %s (%s): %s", path, v.kind, v.reason)
    text = (f"sandbox: {len(results)} files ok" if not refused
            else f"[red]sandbox refused {len(refused)} of {len(results)} files[/] in {out_dir}")
    _say(args, "verified", text, out_dir=str(out_dir), files=len(results),
         refused=[{"file": str(p.relative_to(out_dir)), "kind": v.kind, "reason": v.reason} for p, v in refused])


def _reload(node: SwarmNode, args: argparse.Namespace) -> None:
    """SIGHUP: read the config file again and take its mirrors (flags and env still win); peers stay."""
    import os

    from autoglm.node._keys import load_trust_policy
    from autoglm.node._metrics import mirror_label
    from autoglm.node._settings import find_config, read_config, resolve

    flags = {name: (v.value, v.where) for name, v in args.settings.items() if v.source == "flag"}
    try:
        path, searched = find_config(args.config, os.environ)
        values = resolve(read_config(path, searched), os.environ, flags)
    except AutoglmError as exc:  # a broken file keeps the running settings
        log.error("reload failed, keeping the running settings: %s", exc)
        _say(args, "reload-failed", f"[red]reload failed:[/] {exc}", message=str(exc))
        return
    try:
        trust = load_trust_policy(args.data_dir, values["trust.keys"].value, values["trust.roots"].value,
                                  values["trust.spiffe_ids"].value)
    except AutoglmError as exc:
        log.error("reload failed, keeping the running settings: %s", exc)
        _say(args, "reload-failed", f"[red]reload failed:[/] {exc}", message=str(exc))
        return
    node.mirror_urls = tuple(values["mirrors.urls"].value)
    node.trust = trust
    labels = [mirror_label(u) for u in node.mirror_urls]
    log.info("reloaded %s: mirrors %s, %d trusted key(s)", path, labels, len(trust.keys))
    _say(args, "reloaded", f"reloaded {path}: mirrors {labels}, {len(trust.keys)} trusted key(s)",
         config=str(path), mirrors=labels, trusted_keys=len(trust.keys))


def _swarm_key(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--swarm-key {path}: not a readable file of 64 hex characters ({exc})") from exc
    if len(key) != 32:
        raise ConfigError(f"--swarm-key {path}: need 64 hex characters (32 bytes), got {len(key)} bytes")
    from autoglm.node._logs import add_secret

    add_secret(key)
    return key


def _gateway_config(args: argparse.Namespace) -> Any:
    """The gateway's settings from --hf-gateway (or network.gateway), --endpoint, --token-file; None without it."""
    if not getattr(args, "hf_gateway", None):
        if args.endpoint or args.token_file or args.hf_manifest:
            raise ConfigError("--endpoint, --token-file and --hf-manifest are the gateway's: give --hf-gateway HOST:PORT too")
        return None
    from autoglm.node.hub._api import default_endpoints, load_token
    from autoglm.node.hub._gateway import GatewayConfig, check_upstreams, parse_hostport
    from autoglm.node.hub._swarm_flights import load_hub_manifests

    host, port = parse_hostport(args.hf_gateway)
    endpoints = tuple(default_endpoints("hf", args.endpoint))
    check_upstreams(host, port, endpoints)
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("the Hugging Face gateway listens on %s, not loopback: anyone who reaches it reads what the node's token can", host)
    trust = trust_from_args(args)
    manifests = load_hub_manifests(args.hf_manifest, trust) if args.hf_manifest else ()
    return GatewayConfig(endpoints=endpoints, token=load_token(args.token_file), host=host, port=port,
                         manifests=manifests, trust=trust)


def cmd_join(args: argparse.Namespace) -> int:
    import os
    import time

    import trio

    from autoglm.node._engine import collapse_group
    from autoglm.node._metrics import parse_hostport
    from autoglm.node._p2p import RelayBudget
    from autoglm.node._sdnotify import notify
    from autoglm.node._startup import resume as resume_gc
    from autoglm.node._swarm_node import JoinConfig, open_swarm_node
    from autoglm.node.swarm import Announced, PeerBanned, SwarmConfig, SwarmEvent

    from ._update_cmds import hf_cache_from_args

    follow_hf = hf_cache_from_args(args)
    if follow_hf is not None:
        from autoglm.node._hfversions import hub_repo_of

        if not args.follow:
            raise ConfigError("--hf-cache goes with --follow NAME")
        for name in args.follow:
            if hub_repo_of(name) is None:
                raise ConfigError(f"--follow {name} --hf-cache: only a model published with publish hf:// "
                                  "(named hf:ORG/REPO) has a place in the Hugging Face cache")
    host, _, port = args.peerwire.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--peerwire {args.peerwire!r} is not HOST:PORT")
    config = JoinConfig(
        data_dir=args.data_dir,
        listen=tuple(args.listen or [DEFAULT_LISTEN]),
        bootstrap=(*args.bootstrap, *configured_bootstrap(args.data_dir)),
        swarm=SwarmConfig(upload_slots=args.upload_slots, up_rate=args.up_rate, down_rate=args.down_rate,
                          peerwire_host=host, peerwire_port=int(port), swarm_key=_swarm_key(args.swarm_key)),
        mirrors=tuple(args.mirror),
        metrics=None if args.metrics is None else parse_hostport(args.metrics),
        relay=RelayBudget() if args.relay else None,
    )

    async def show_swarm_events(recv: trio.MemoryReceiveChannel[SwarmEvent]) -> None:
        async with recv:
            async for ev in recv:
                if isinstance(ev, Announced) and args.json:
                    print_json({"event": "announced", "kind": ev.kind, "key": ev.key.hex()})
                elif isinstance(ev, PeerBanned):
                    _say(args, "banned", f"[red]banned peer {ev.peer_id}[/]: {ev.reason}",
                         peer_id=ev.peer_id, manifest_id=ev.manifest_id.hex(), reason=ev.reason)

    gateway = _gateway_config(args)

    async def run() -> None:
        send, recv = trio.open_memory_channel[SwarmEvent](256)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with open_swarm_node(config, send) as node, trio.open_nursery() as nursery:
                nursery.start_soon(show_swarm_events, recv)
                extra: dict[str, Any] = {}
                if gateway is not None:
                    from functools import partial

                    from autoglm.node._metrics import watch_gateway
                    from autoglm.node.hub._gateway import serve_gateway
                    from autoglm.node.hub._swarm_flights import swarm_fleet

                    nm = node.metrics  # the gateway's hub bytes and served bytes in /metrics
                    hub_events = None if nm is None else partial(nm.observe, as_kind="hub")
                    gw = await nursery.start(partial(serve_gateway, node.node.store, gateway, hold=node.hold, names=node,
                                                     on_event=hub_events, fleet=swarm_fleet(node.swarm)))
                    if nm is not None:
                        watch_gateway(nm, gw.stats)
                    extra["hf_gateway"] = f"http://{gw.address[0]}:{gw.address[1]}"
                    # the repo@commit a --hf-manifest covers: those come from the swarm
                    extra["hf_gateway_swarm"] = [f"{m.provenance.repo}@{m.provenance.commit[:12]}" for m in gateway.manifests]
                addrs = node.p2p.addrs()
                # The first line is the readiness signal and what others join with.
                metrics = None if node.metrics_addr is None else "http://{}:{}/metrics".format(*node.metrics_addr)
                node.trust = trust_from_args(args)
                _say(args, "ready", addrs[0] if addrs else "(no listen address)", addrs=addrs,
                     peer_id=node.p2p.peer_id, peerwire=node.swarm.status()["peerwire"], metrics=metrics, **extra)
                resume_gc()  # start-up is over (node/_startup.py)
                # Type=notify units: started once the node listens (no-op without NOTIFY_SOCKET).
                notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS=listening on {addrs[0] if addrs else '-'}")
                if gateway is not None:
                    url = extra["hf_gateway"]
                    _say(args, "hf-gateway", f"Hugging Face gateway: HF_ENDPOINT={url} (upstream {', '.join(gateway.endpoints)}; "
                         "hub-attested)", url=url, endpoints=list(gateway.endpoints))
                for i, m in enumerate(args.seed):
                    nursery.start_soon(_seed, node, args, i, m)
                if args.follow:
                    from autoglm.node._follow import FollowConfig, follow

                    for name in args.follow:
                        cfg = FollowConfig(name, keep=args.follow_keep, interval_min=min(5.0, args.follow_interval),
                                           interval_max=args.follow_interval, hf_cache=follow_hf)
                        await nursery.start(follow, node, cfg)
                async for sig in signals:
                    if sig == signal.SIGHUP:
                        notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
                        _reload(node, args)
                        notify("READY=1")
                        continue
                    notify("STOPPING=1")
                    # Running fetches get SHUTDOWN_GRACE seconds to finish their pieces;
                    # verified pieces are durable either way (a restart resumes).
                    _say(args, "stopping", f"stopping (up to {SHUTDOWN_GRACE:.0f} s for running fetches)",
                         grace=SHUTDOWN_GRACE)
                    with trio.move_on_after(SHUTDOWN_GRACE):
                        await node.drain()
                    nursery.cancel_scope.cancel()
                    break
        _say(args, "stopped", "stopped")

    try:
        trio.run(run)
    except BaseExceptionGroup as eg:
        raise collapse_group(eg) from None
    return 0


def _ask(data_dir: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request to the running node's control API; its first reply line."""
    from autoglm.node._control_client import request as control_request

    for line in control_request(data_dir, request, timeout=timeout):
        return line
    raise ConfigError(f"the node sent no answer to {request['op']!r}")


def cmd_status(args: argparse.Namespace) -> int:
    st = _ask(args.data_dir, {"op": "status"}, 10)
    if args.json:
        print_json(st)
        return 0
    console.print(f"peer [bold]{st['peer_id']}[/]  dht {st['dht_size']}  peerwire {st['peerwire']}", soft_wrap=True)
    for a in st["addrs"]:
        console.print(f"  join with {a}", soft_wrap=True)
    console.print(f"peers {len(st['peers'])}  up {human_bytes(st['up_bytes'])}  down from peers {human_bytes(st['down_bytes'])}")
    h = st.get("health") or {}
    if h:
        why = "; ".join(h.get("reasons", []))
        console.print(f"health {h['status']}" + (f": {why}" if why else ""), soft_wrap=True)
    for mid, m in st.get("models", {}).items():
        pct = 100.0 * m["bytes_done"] / m["bytes_total"] if m["bytes_total"] else 100.0
        kinds: dict[str, int] = {}
        for k, v in m["bytes_by_source"].items():
            kinds[k.split(":", 1)[0]] = kinds.get(k.split(":", 1)[0], 0) + v
        by = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(kinds.items()))
        console.print(f"  {m['name']} {m['version']} {pct:.0f}% {human_bytes(m['rate'])}/s ({by}) {mid[:16]}", soft_wrap=True)
    if st["banned"]:
        err_console.print(f"banned: {st['banned']}")
    return 0


def cmd_name_publish(args: argparse.Namespace) -> int:
    req = {"op": "name_publish", "key": str(args.key.resolve()), "manifest": str(args.manifest.resolve()), "seq": args.seq}
    if args.preheat is not None:
        req["preheat"] = {"out": str(args.preheat.resolve()), "mirrors": list(args.mirror)}
    elif args.mirror:
        raise ConfigError("name-publish --mirror is for --preheat")
    if args.rollout is not None:
        if not 0 < args.rollout <= 100:
            raise ConfigError("--rollout is a percentage above 0 and at most 100")
        req["rollout"] = max(1, round(args.rollout * 10_000))

    reply = _ask(args.data_dir, req, 3600 if args.preheat is not None else 60)
    if reply.get("event") == "error":
        raise ConfigError(f"name-publish: {reply['message']}")
    if args.json:
        print_json(reply)
    else:
        share = "" if reply.get("rollout", 1_000_000) >= 1_000_000 else f", roll-out {reply['rollout'] / 10_000:g} %"
        console.print(f"{reply['key']} -> {reply['manifest_id'][:16]} (version {reply['version']}, seq {reply['seq']}{share})")
    return 0
