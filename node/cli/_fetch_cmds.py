"""fetch, ls, gc."""

from __future__ import annotations

import argparse
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoglm.node.errors import ConfigError

from ._common import console, err_console, errors_reported, human_bytes, print_json, relay_control
from ._manifest_cmds import add_trust_args, trust_from_args
from ._progress_view import FetchView as _Renderer

if TYPE_CHECKING:
    from autoglm.node._engine import FetchResult

# Heavy modules load inside the commands (see _manifest_cmds.py): a fetch
# handed to a running node needs only the standard library.

__all__ = ["register"]

_MIRROR_HEADER = re.compile(r"^(https?://\S+?)=([A-Za-z0-9!#$%&'*+.^_`|~-]+):(.*)$")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fetch", help="fetch a model: verified, resumable, from peers and HTTP mirrors",
        description="With a `join` node running on this data directory, the fetch is handed to it "
        "(it uses its peers and keeps serving the model afterwards). Otherwise, with bootstrap "
        "peers (--bootstrap or DATA_DIR/bootstrap), an ephemeral node joins the swarm for this "
        "fetch; with none, the fetch uses the mirrors alone.",
    )
    p.add_argument("manifest", metavar="MANIFEST", help="manifest file or http(s) URL, or hf://ORG/REPO[@REV] / ms://ORG/REPO[@REV]")
    p.add_argument("--mirror", action="append", default=[], metavar="URL", help="mirror base URL (repeatable)")
    p.add_argument(
        "--mirror-header", action="append", default=[], metavar="URL=NAME: VALUE",
        help="extra header for one mirror, e.g. 'https://m/=Authorization: Bearer X' (repeatable)",
    )
    p.add_argument("--header", action="append", default=[], metavar="NAME: VALUE", help="extra header for every mirror and the manifest URL")
    p.add_argument("--out", type=Path, metavar="DIR", help="where the model files go (required for a manifest)")
    add_trust_args(p)
    p.add_argument("--variant", metavar="auto|all|NAME", help="fetch only one variant's files (default: all files)")
    p.add_argument("--connections", type=int, default=4, metavar="N", help="initial connections per mirror (adapts up to --max-connections)")
    p.add_argument("--max-connections", type=int, default=16, metavar="N")
    p.add_argument("--stall-timeout", type=float, default=20.0, metavar="SECONDS", help="give up on a request with no progress for this long")
    p.add_argument("--mirror-rtt-threshold", type=float, default=0.2, metavar="SECONDS",
                   help="a mirror slower than this to answer is degraded: its work moves to a healthy mirror")
    p.add_argument("--mirror-error-threshold", type=float, default=0.05, metavar="FRACTION",
                   help="a mirror with more errors than this is degraded")
    p.add_argument("--check-sha256", action="store_true", help="also re-read each finished file and check its SHA-256")
    p.add_argument("--no-space-check", action="store_true", help="skip the free-space preflight (not recommended)")
    p.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                   help="join the swarm through this peer for this fetch (repeatable; also DATA_DIR/bootstrap)")
    p.add_argument("--standalone", action="store_true", help="do not hand the fetch to a running node or use peers")
    p.add_argument("--json", action="store_true", help="one JSON object per line: progress, then a final 'done' summary")
    p.add_argument("--hf-cache", action="store_true",
                   help="for a manifest made by publish hf://: also write the Hugging Face cache layout (--cache-dir, else HF_HUB_CACHE ...)")
    from autoglm.node.hub._cli import add_hub_args

    add_hub_args(p)
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("ls", help="list models in the local store and their state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("gc", help="remove stale staging files, versions outside the kept set, and forget data that is gone")
    p.add_argument("--incomplete", action="store_true", help="also drop unfinished downloads (their partial data)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_gc)


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise ConfigError(f"not a header: {text!r} (use 'Name: value')")
    return name.strip(), value.strip()


def _own_mirror_headers(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """--mirror-header: mirror URL -> the headers for that mirror alone."""
    own: dict[str, dict[str, str]] = {}
    for spec in args.mirror_header:
        # The URL may hold '=' (a query) and the value too (base64 tokens): the split
        # is the '=' that is followed by a header name and a colon.
        found = _MIRROR_HEADER.match(spec)
        if not found:
            raise ConfigError(f"--mirror-header needs URL=NAME: VALUE, got {spec!r}")
        url, k, v = found.group(1), found.group(2), found.group(3).strip()
        match = [m for m in args.mirror if m.rstrip("/") == url.rstrip("/")]
        if not match:
            raise ConfigError(f"--mirror-header names {url}, which is not one of the --mirror URLs")
        for m in match:
            own.setdefault(m, {})[k] = v
    return own


def _mirror_headers(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """Every --mirror URL -> the headers its requests carry (--header, then its --mirror-header)."""
    common = dict(_header(h) for h in args.header)
    own = _own_mirror_headers(args)
    return {m: {**common, **own.get(m, {})} for m in args.mirror}


def _plan_wire(args: argparse.Namespace, files: list[str] | None) -> dict[str, Any]:
    """The fetch plan from the command line, in the control API's form (``FetchPlan.to_wire``).

    Built once, here, with the standard library alone: a running node gets
    it as it is, and a fetch run here turns it into a ``FetchPlan`` with
    ``FetchPlan.from_wire``. Every flag rides in it on every path.
    """
    return {
        "manifest": _absolute(args.manifest),
        "out": str(args.out.resolve()),
        "mirrors": list(args.mirror),
        "headers": dict(_header(h) for h in args.header),
        "mirror_headers": _own_mirror_headers(args),
        "mirror_config": {
            "initial_connections": args.connections,
            "max_connections": max(args.connections, args.max_connections),
            "stall_timeout": args.stall_timeout,
            "rtt_threshold": args.mirror_rtt_threshold,
            "error_threshold": args.mirror_error_threshold,
        },
        "options": {"check_space": not args.no_space_check, "check_sha256": args.check_sha256},
        "files": files,
    }


def _files_for_variant(args: argparse.Namespace, manifest: Any) -> list[str] | None:
    if not args.variant or args.variant == "all":
        return None
    try:
        from autoglm.node._variants import resolve_variant
    except ImportError as exc:  # pragma: no cover
        raise ConfigError("--variant is not available in this build") from exc
    variant, warnings = resolve_variant(manifest, args.variant)
    for w in warnings:
        err_console.print(f"[yellow]warning:[/] {w}")
    return None if variant is None else list(variant.files)


def _is_name(manifest: str) -> bool:
    """``hf:ORG/REPO``: the name ``publish hf://…`` gives, resolved through a signed name record (not a file here)."""
    return manifest.startswith("hf:") and not manifest.startswith("hf://") and not Path(manifest).exists()


def _absolute(manifest: str) -> str:
    return manifest if manifest.startswith(("http://", "https://")) else str(Path(manifest).resolve())


def _delegate(args: argparse.Namespace, sock: socket.socket, renderer: _Renderer) -> dict[str, Any]:
    """Hand the fetch to the `join` node running on this data directory; relay its events.

    Blocking and light: no event loop, engine or manifest parsing here (the
    node checks the manifest and the trust itself).
    """
    files = _files_for_variant(args, _load_manifest_here(args)[1]) if args.variant and args.variant != "all" else None
    request = {
        "op": "fetch", **_plan_wire(args, files), "trust": [str(p.resolve()) for p in args.trust],
        "roots": [str(p.resolve()) for p in args.root], "spiffe_ids": args.spiffe_id,
    }
    if _is_name(args.manifest):  # the node resolves the signed name record (publish hf://… --name-publish)
        del request["manifest"]
        request["name"] = args.manifest
    return relay_control(args.data_dir, request, sock, renderer.handle_line, final="result", what="fetch")


def _load_manifest_here(args: argparse.Namespace) -> Any:
    import trio

    from autoglm.node.api import load_manifest

    common = dict(_header(h) for h in args.header)
    trust = trust_from_args(args)
    return trio.run(load_manifest, args.manifest, trust, common)


def cmd_fetch(args: argparse.Namespace) -> int:
    renderer = _Renderer(args.json, quiet=getattr(args, "quiet", False))
    from autoglm.node.hub._cli import cmd_fetch_hub, is_hub_ref

    if is_hub_ref(args.manifest):  # a Hugging Face / ModelScope repository: node/hub
        return cmd_fetch_hub(args, renderer)
    if _is_name(args.manifest) and (args.standalone or args.variant or args.hf_cache):
        raise ConfigError(f"fetch {args.manifest} (a name) goes through the running `join` node; "
                          "--standalone, --variant and --hf-cache need the manifest file")
    hf_state = None
    if args.hf_cache:  # sets --out to a folder inside the cache when not given
        from autoglm.node.hub._publish_cli import prepare_hf_cache_fetch

        hf_state = prepare_hf_cache_fetch(args)
    if not args.manifest.startswith(("http://", "https://")) and Path(args.manifest + ".hub.json").is_file():
        # publish hf://: the Hub endpoints named in the signed provenance are web seeds
        from autoglm.node.hub._publish import with_sidecar_mirrors

        args.mirror = list(with_sidecar_mirrors(args.manifest, args.mirror))
    if not args.mirror and args.manifest.startswith(("http://", "https://")):
        # The usual layout: the manifest beside the files. Said, so nobody wonders where bytes came from.
        args.mirror = [args.manifest.rsplit("/", 1)[0] + "/"]
        if not args.json and not getattr(args, "quiet", False):
            err_console.print(f"no --mirror given: using the manifest's folder {args.mirror[0]} as the mirror",
                              soft_wrap=True, markup=False, highlight=False)
    if args.out is None:
        raise ConfigError("fetch MANIFEST needs --out DIR")
    t0 = time.perf_counter()
    with errors_reported(renderer.close, args.json):
        sock = None
        if not args.standalone:
            from autoglm.node._control_client import connect

            sock = connect(args.data_dir)
        if sock is None and _is_name(args.manifest):
            raise ConfigError(f"fetch {args.manifest}: resolving a name needs `autoglm-node join` running on this data directory")
        if sock is not None:
            line = _delegate(args, sock, renderer)
            result = {k: line.get(k) for k in ("bytes_total", "bytes_by_source", "received_by_source")}
            result.update(out=line.get("out_dir"), refetched_bytes=0)
        else:
            res = _fetch_here(args, renderer)
            result = {"bytes_total": res.bytes_total, "bytes_by_source": res.bytes_by_source,
                      "received_by_source": res.received_by_source, "out": res.out_dir,
                      "refetched_bytes": res.refetched_bytes}
    if hf_state is not None:
        from autoglm.node.hub._publish_cli import hf_cache_after_fetch

        files = _files_for_variant(args, _load_manifest_here(args)[1]) if args.variant and args.variant != "all" else None
        result["hf_snapshot"] = str(hf_cache_after_fetch(hf_state, Path(str(result["out"])), files))
    seconds = time.perf_counter() - t0
    if args.json:
        print_json({"event": "done", **result, "seconds": round(seconds, 3)})
    else:
        renderer.summary(result, seconds)
    return 0


def _fetch_here(args: argparse.Namespace, renderer: _Renderer) -> FetchResult:
    """No running node to hand the fetch to: an ephemeral swarm node (with bootstrap peers) or mirrors alone."""
    import trio

    from autoglm.node._config import configured_bootstrap
    from autoglm.node._engine import collapse_group
    from autoglm.node._plan import FetchPlan
    from autoglm.node._progress import Event
    from autoglm.node.api import NodeConfig, load_manifest, open_node

    bootstrap = [] if args.standalone else [*args.bootstrap, *configured_bootstrap(args.data_dir)]
    trust = trust_from_args(args)

    async def main() -> FetchResult:
        signed, manifest = await load_manifest(args.manifest, trust, dict(_header(h) for h in args.header))
        plan = FetchPlan.from_wire(_plan_wire(args, _files_for_variant(args, manifest)), trust, signed)
        send, recv = trio.open_memory_channel[Event](256)

        async def consume() -> None:
            async with recv:
                async for ev in recv:
                    renderer.handle(ev)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            if bootstrap:
                from autoglm.node._swarm_node import JoinConfig, fetch_with_peers

                return await fetch_with_peers(JoinConfig(args.data_dir, bootstrap=tuple(bootstrap)), plan, events=send)
            if not args.mirror:
                raise ConfigError("give a --mirror URL, --bootstrap peers, or start `autoglm-node join` first")
            async with open_node(NodeConfig(args.data_dir)) as node:
                return await node.run_fetch(plan, events=send)

    try:
        return trio.run(main)
    except BaseExceptionGroup as eg:
        raise collapse_group(eg) from None


def cmd_ls(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from autoglm.node._store import Store

    store = Store(args.data_dir)
    try:
        rows = store.downloads()
    finally:
        store.close()
    if args.json:
        for r in rows:
            print_json({
                "name": r.name, "version": r.version, "id": r.manifest_id.hex(), "out": str(r.out_dir),
                "pieces_done": r.pieces_done, "pieces_total": r.pieces_total,
                "bytes_done": r.bytes_done, "bytes_total": r.bytes_total, "complete": r.completed,
                "problem": r.problem,
            })
        return 0
    if not rows:
        console.print("the store is empty")
        return 0
    table = Table(show_edge=False)
    for col in ("model", "version", "id", "state", "size", "location"):
        table.add_column(col)
    for r in rows:
        state = "[green]complete[/]" if r.completed else f"[yellow]{100 * r.bytes_done / max(r.bytes_total, 1):.0f}%[/] ({r.pieces_done}/{r.pieces_total} pieces)"
        if r.problem:  # finished once, but not what is on disk now: `fetch` again repairs it
            state = f"[red]damaged[/]: {escape(r.problem)}; fetch again to repair"
        table.add_row(r.name, r.version, r.manifest_id.hex()[:12], state, human_bytes(r.bytes_total), str(r.out_dir))
    console.print(table)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from autoglm.node._store import Store
    from autoglm.node._versions import collect_versions

    from ._update_cmds import tell_node_withdrawn

    # Versions first (never current, never a kept one; node/_versions.py), so
    # the store then forgets the removed copies; a running node withdraws them.
    actions, gone = collect_versions(args.data_dir)
    store = Store(args.data_dir)
    try:
        before = set(store.manifest_ids())
        actions += store.gc(drop_incomplete=args.incomplete)
        gone += before - set(store.manifest_ids())
    finally:
        store.close()
    actions += tell_node_withdrawn(args.data_dir, gone)
    if args.json:
        print_json({"actions": actions})
    else:
        for a in actions:
            console.print(a)
        console.print(f"gc: {len(actions)} action(s)")
    return 0
