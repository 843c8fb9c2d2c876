"""update, rollback, versions: a model's versions on disk and the atomic switch of ``current``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from autoglm.node.errors import ConfigError

from ._common import console, err_console, errors_reported, human_bytes, print_json, relay_control
from ._manifest_cmds import add_trust_args, trust_from_args
from ._progress_view import FetchView as _Renderer

__all__ = ["add_hf_cache_args", "hf_cache_from_args", "register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "update", help="fetch a new version (only what changed), check it, and switch DIR/current to it atomically",
        description="NAME (a signed name record; needs `join` running on this data directory) or MANIFEST. "
        "The version goes into VERSIONS_DIR/versions/<version>-<id>; pieces already in the store are copied, "
        "not fetched; every file passes the sandbox gate; then VERSIONS_DIR/current is switched with one "
        "rename(2). Readers see the old version or the new one, never a mix (docs/operations.md).",
    )
    p.add_argument("target", metavar="NAME|MANIFEST")
    p.add_argument("--versions-dir", type=Path, metavar="DIR", help="where the versions live (default DATA_DIR/models/<NAME>)")
    p.add_argument("--keep", type=int, default=2, metavar="K", help="earlier versions kept for rollback (default 2)")
    p.add_argument("--mirror", action="append", default=[], metavar="URL", help="mirror base URL (repeatable)")
    p.add_argument("--standalone", action="store_true", help="do not hand the update to a running node (MANIFEST only)")
    p.add_argument("--json", action="store_true", help="JSON lines: progress, then an 'updated' summary")
    add_hf_cache_args(p)
    add_trust_args(p)
    p.set_defaults(func=cmd_update)

    p = sub.add_parser("rollback", help="switch DIR/current back to the version used before (fetches nothing)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--versions-dir", type=Path, metavar="DIR", help="where the versions live (default DATA_DIR/models/<NAME>)")
    p.add_argument("--keep", type=int, default=2, metavar="K", help="earlier versions kept (default 2)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("versions", help="list a model's versions on disk and which is current")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--versions-dir", type=Path, metavar="DIR", help="where the versions live (default DATA_DIR/models/<NAME>)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_versions)


def add_hf_cache_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str = "the new version") -> None:
    """``--hf-cache``, ``--cache-dir``, ``--hf-revision`` (update, and join --follow)."""
    p.add_argument("--hf-cache", action="store_true",
                   help=f"also put {what} into the Hugging Face cache layout (a model published with publish hf://, "
                   "by NAME hf:ORG/REPO or a MANIFEST with its .hub.json): blobs are hard links to the version's "
                   "files, then refs/<revision> is replaced with one rename(2) after current (docs/huggingface.md)")
    p.add_argument("--cache-dir", type=Path, metavar="DIR",
                   help="with --hf-cache: the Hugging Face cache (default: HF_HUB_CACHE, or HF_HOME/hub)")
    p.add_argument("--hf-revision", metavar="REV",
                   help="with --hf-cache: the ref to move (default: the .hub.json's revision, else the one this "
                   "versions directory last moved, else main)")


def hf_cache_from_args(args: argparse.Namespace) -> Any:
    """The ``HfCache`` the --hf-cache arguments ask for, or None."""
    if not args.hf_cache:
        if args.cache_dir is not None or args.hf_revision is not None:
            raise ConfigError("--cache-dir and --hf-revision go with --hf-cache")
        return None
    from autoglm.node._hfversions import HfCache, check_revision
    from autoglm.node.hub._cache import hub_cache_dir

    rev = check_revision(args.hf_revision) if args.hf_revision is not None else None
    return HfCache((args.cache_dir or hub_cache_dir()).expanduser().resolve(), rev)


def _root(args: argparse.Namespace, name: str) -> Path:
    from autoglm.node._versions import default_root

    return Path(args.versions_dir).resolve() if args.versions_dir else default_root(Path(args.data_dir), name)


def _is_manifest(target: str) -> bool:
    return target.startswith(("http://", "https://")) or Path(target).exists()


def _request(args: argparse.Namespace) -> dict[str, Any]:
    req: dict[str, Any] = {
        "op": "update", "keep": args.keep, "mirrors": list(args.mirror),
        "trust": [str(p.resolve()) for p in args.trust], "roots": [str(p.resolve()) for p in args.root],
        "spiffe_ids": list(args.spiffe_id),
    }
    if _is_manifest(args.target):
        req["manifest"] = args.target if args.target.startswith(("http://", "https://")) else str(Path(args.target).resolve())
    else:
        req["name"] = args.target
    if args.versions_dir:
        req["root"] = str(Path(args.versions_dir).resolve())
    hf = hf_cache_from_args(args)
    if hf is not None:
        req["hf_cache"] = hf.to_wire()
    return req


def _delegate(args: argparse.Namespace, sock: Any, renderer: _Renderer) -> dict[str, Any]:
    return relay_control(args.data_dir, _request(args), sock, renderer.handle_line, final="updated", what="update")


def _update_here(args: argparse.Namespace, renderer: _Renderer) -> dict[str, Any]:
    """No running node: the update with the mirrors alone, in this process."""
    import trio

    from autoglm.node._engine import collapse_group
    from autoglm.node._follow import _result_value, _with_provenance
    from autoglm.node._plan import FetchPlan
    from autoglm.node._progress import Event
    from autoglm.node._update import update_to
    from autoglm.node.api import NodeConfig, load_manifest, open_node

    trust = trust_from_args(args)
    mirrors = list(args.mirror)
    if not mirrors and args.target.startswith(("http://", "https://")):
        mirrors = [args.target.rsplit("/", 1)[0] + "/"]
    if not mirrors:
        raise ConfigError("update MANIFEST without a running node needs --mirror URL")

    async def main() -> dict[str, Any]:
        signed, manifest = await load_manifest(args.target, trust, {})
        root = _root(args, manifest.name)
        hf = hf_cache_from_args(args)
        if hf is not None:
            hf = await trio.to_thread.run_sync(_with_provenance, hf, args.target, signed)
        send, recv = trio.open_memory_channel[Event](256)
        async with open_node(NodeConfig(args.data_dir)) as node, trio.open_nursery() as nursery:

            async def consume() -> None:
                async with recv:
                    async for ev in recv:
                        renderer.handle(ev)

            nursery.start_soon(consume)
            plan = FetchPlan(signed, root, trust, mirrors=tuple(mirrors))

            async def fetch(p: FetchPlan, ev: trio.MemorySendChannel[Event] | None) -> Any:
                return await node.run_fetch(p, events=ev)

            try:
                res = await update_to(signed, plan, root, args.keep, Path(args.data_dir), fetch, send, node.store, hf)
            except BaseException:
                await send.aclose()
                raise
            return _result_value(res)

    try:
        return trio.run(main)
    except BaseExceptionGroup as eg:
        raise collapse_group(eg) from None


def tell_node_withdrawn(data_dir: Path, manifest_ids: list[bytes]) -> list[str]:
    """A `join` node running on ``data_dir`` stops announcing ``manifest_ids`` (their pieces were removed here).

    The store already forgot them (node/_versions.forget_in_store), so a
    node started later never announces them; a running one re-reads and
    withdraws (peers hear an empty bitfield, Hello and the DHT drop them).
    Returns what was done, one line each; nothing when no node runs. A node
    that cannot be told is said in a line (the removal itself is done).
    """
    from autoglm.node._control_client import connect, request
    from autoglm.node.errors import AutoglmError

    if not manifest_ids:
        return []
    sock = connect(data_dir)
    if sock is None:
        return []
    req = {"op": "withdraw", "manifest_ids": sorted({m.hex() for m in manifest_ids})}
    why = "it closed the connection"
    try:
        for line in request(data_dir, req, timeout=30, sock=sock):
            if line.get("event") == "withdrawn":
                return [f"the running node no longer announces {str(m)[:16]}" for m in line.get("unheld", [])]
            if line.get("event") == "error":
                why = str(line.get("message"))
                break
    except AutoglmError as exc:
        why = str(exc)
    return [f"warning: the running node may still announce the removed versions ({why}); restart it"]


def cmd_update(args: argparse.Namespace) -> int:
    if args.keep < 0:
        raise ConfigError("--keep is 0 or more")
    hf_cache_from_args(args)  # a bad --hf-revision is refused before anything runs
    if _is_manifest(args.target) and not args.target.startswith(("http://", "https://")):
        # publish hf://: the Hub endpoints named in the signed provenance are web seeds
        from autoglm.node.hub._publish import with_sidecar_mirrors

        args.mirror = list(with_sidecar_mirrors(args.target, args.mirror))
    renderer = _Renderer(args.json, quiet=getattr(args, "quiet", False))
    t0 = time.perf_counter()
    with errors_reported(renderer.close, args.json):
        from autoglm.node._control_client import connect

        sock = None if args.standalone else connect(args.data_dir)
        if sock is None and not _is_manifest(args.target):
            raise ConfigError(f"update {args.target}: resolving a name needs `autoglm-node join` running on this "
                              "data directory (or give the MANIFEST file or URL)")
        result = _delegate(args, sock, renderer) if sock is not None else _update_here(args, renderer)
    result = {k: v for k, v in result.items() if k != "event"}
    seconds = round(time.perf_counter() - t0, 3)
    if args.json:
        print_json({"event": "updated", **result, "seconds": seconds})
    elif result["switched"]:
        fetched = sum(v for k, v in result["bytes_by_source"].items() if not k.startswith("local"))
        console.print(f"{result['root']}/current -> versions/{result['current']} (was {result['previous']}); "
                      f"fetched {human_bytes(fetched)} in {seconds:.1f}s", soft_wrap=True)
    else:
        console.print(f"{result['root']}/current is already {result['current']}", soft_wrap=True)
    if not args.json and result.get("hf_snapshot"):
        console.print(f"Hugging Face cache: {result['hf_snapshot']}", soft_wrap=True, markup=False)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from autoglm.node._update import rollback

    root = _root(args, args.name)
    told: list[str] = []
    # The node hears of pruned versions before the ref is written: a failed ref write must not
    # leave it announcing pieces whose files are gone.
    res = rollback(root, args.keep, Path(args.data_dir),
                   withdrawn_hook=lambda ids: told.extend(tell_node_withdrawn(Path(args.data_dir), ids)))
    ref = None
    if res.hub is not None:
        from autoglm.node.hub._cache import repo_dir

        ref = str(repo_dir(Path(res.hub.cache), res.hub.repo) / "refs" / res.hub.revision)
    if args.json:
        print_json({"event": "rolled-back", "root": str(root), "current": res.current, "previous": res.previous,
                    "pruned": res.pruned, "withdrawn": [m.hex() for m in res.withdrawn],
                    "hf_ref": ref, "hf_commit": res.hub.commit if res.hub is not None else None})
        return 0
    console.print(f"{root}/current -> versions/{res.current} (was {res.previous}); nothing fetched", soft_wrap=True)
    if res.hub is not None:
        console.print(f"{ref} -> {res.hub.commit}", soft_wrap=True, markup=False)
    elif res.hub_left is not None:
        err_console.print(f"{res.current} was not installed with --hf-cache: the Hugging Face cache still names "
                          f"{res.hub_left.commit[:12]} ({res.previous})")
    for line in [*(f"removed version {d} (out of the kept set)" for d in res.pruned), *told]:
        console.print(line, soft_wrap=True, markup=False)
    err_console.print("a `join --follow` node keeps this until the name gets a higher sequence number")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    from autoglm.node._versions import VersionSet

    root = _root(args, args.name)
    vs = VersionSet(root)
    rows = vs.entries()
    pins = {r.dirname: vs.hub_pin(r.dirname) for r in rows}
    if args.json:
        for r in rows:
            pin = pins[r.dirname]
            print_json({"version": r.dirname, "path": str(r.path), "current": r.current,
                        "hf_commit": pin.commit if pin is not None else None})
        return 0
    if not rows:
        console.print(f"no versions under {root}")
    for r in rows:
        pin = pins[r.dirname]
        hf = f"  (hf {pin.repo}@{pin.commit[:12]})" if pin is not None else ""
        console.print(f"{'*' if r.current else ' '} {r.dirname}  {r.path}{hf}", soft_wrap=True, markup=False)
    return 0
