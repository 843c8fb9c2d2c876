"""``autoglm-node fetch hf://ORG/REPO[@REV]`` (and ``ms://``): flags and the command, called from cli/_fetch_cmds.py."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._fetch import HubFetchPlan

__all__ = ["add_hub_args", "cmd_fetch_hub", "is_hub_ref"]

TRUST_LINE = (
    "hub-attested: file identities (SHA-256, git blob ids) come from the endpoints{tls}, "
    "not from a publisher's signature"
)


def is_hub_ref(text: str) -> bool:
    return text.startswith(("hf://", "ms://"))


def add_hub_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hf:// and ms:// (Hugging Face Hub, ModelScope)")
    g.add_argument("--endpoint", action="append", default=[], metavar="URL",
                   help="another endpoint serving the same repositories (repeatable; HF_ENDPOINT or the public hub comes first)")
    g.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: @REV in the reference, else main)")
    g.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the access token (default: HF_TOKEN, then huggingface_hub's stored token)")
    g.add_argument("--include", action="append", default=[], metavar="GLOB", help="fetch only matching files (repeatable), as hf download")
    g.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip matching files (repeatable), as hf download")
    g.add_argument("--local-dir", type=Path, metavar="DIR", help="write a plain folder instead of the Hugging Face cache")
    g.add_argument("--cache-dir", type=Path, metavar="DIR", help="the Hugging Face cache (default: HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub)")
    g.add_argument("--piece-size", type=int, default=8 << 20, metavar="BYTES", help="resume and hash unit for hub files (default 8 MiB)")


def _plan(args: argparse.Namespace) -> HubFetchPlan:
    from autoglm.node.errors import ConfigError

    from ._api import default_endpoints, load_token, parse_ref
    from ._fetch import HubFetchPlan

    ref = parse_ref(args.manifest, args.revision)
    # Only flags typed for this command are refused: mirrors or trust keys from the config
    # file or the environment are for manifests and simply do not apply here.
    settings = getattr(args, "settings", None)
    typed = None if settings is None else {v.key.dest for v in settings.values() if v.source == "flag" and v.key.dest}
    ignored = [flag for dest, flag in (("mirror", "--mirror"), ("mirror_header", "--mirror-header"), ("header", "--header"),
                                       ("trust", "--trust"), ("root", "--root"), ("spiffe_id", "--spiffe-id"),
                                       ("bootstrap", "--bootstrap"))
               if (dest in typed if typed is not None else getattr(args, dest, None))]
    if args.variant:
        ignored.append("--variant")
    if ignored:
        raise ConfigError(f"not used with {ref.hub}:// references: {', '.join(ignored)} (another hub endpoint: --endpoint URL)")
    if not 4096 <= args.piece_size <= 256 << 20:
        raise ConfigError("--piece-size must be between 4096 bytes and 256 MiB")
    if args.out is not None and args.local_dir is None:
        args.local_dir = args.out  # --out DIR means a plain folder, as for manifests
    return HubFetchPlan(
        ref=ref,
        endpoints=tuple(default_endpoints(ref.hub, args.endpoint)),
        token=load_token(args.token_file),
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        local_dir=args.local_dir.expanduser().resolve() if args.local_dir is not None else None,
        cache_dir=args.cache_dir.expanduser().resolve() if args.cache_dir is not None else None,
        piece_size=args.piece_size,
    )


def cmd_fetch_hub(args: argparse.Namespace, renderer: Any) -> int:
    """Resolve, fetch through the engine, write the cache layout; prints the hub-attested trust line."""
    import trio

    from autoglm.node._engine import FetchOptions, collapse_group
    from autoglm.node._mirrors import MirrorConfig
    from autoglm.node._progress import Event
    from autoglm.node._store import Store
    from autoglm.node.cli._common import console, err_console, human_bytes, print_json

    from ._api import resolve_snapshot
    from ._fetch import HubFetchResult, fetch_hub

    plan = _plan(args)
    # Requests of at most two pieces: the file's SHA-256 is computed in byte order while it
    # arrives (_verify.py), which needs the connections' runs to stay close together.
    mirror_cfg = MirrorConfig(
        initial_connections=args.connections, max_connections=max(args.connections, args.max_connections),
        stall_timeout=args.stall_timeout, max_request_bytes=max(2 * args.piece_size, 4 << 20),
    )
    # A rate-limited Hub answers 429 many times in a row: keep trying (backoff up to 30 s each)
    # rather than dropping the only endpoint after 8 failures.
    options = FetchOptions(check_space=not args.no_space_check, max_consecutive_failures=50)
    t0 = time.perf_counter()

    async def main() -> HubFetchResult:
        snapshot = await resolve_snapshot(plan.ref, plan.endpoints, plan.token)
        tls = " over TLS" if all(e.startswith("https://") for e in snapshot.endpoints) else ""
        for why in snapshot.dropped:
            err_console.print(f"[yellow]warning:[/] endpoint left out: {why}")
        if args.json:
            print_json({"event": "hub", "repo": plan.ref.repo, "revision": plan.ref.revision, "commit": snapshot.commit,
                        "endpoints": list(snapshot.endpoints), "trust": "hub-attested"})
        else:
            err_console.print(f"{plan.ref} is commit {snapshot.commit} ({len(snapshot.files)} files, "
                              f"{len(snapshot.endpoints)} endpoint(s) agree)")
            err_console.print("[yellow]" + TRUST_LINE.format(tls=tls) + "[/]")
        send, recv = trio.open_memory_channel[Event](256)

        async def consume() -> None:
            async with recv:
                async for ev in recv:
                    renderer.handle(ev)

        store = await trio.to_thread.run_sync(Store, args.data_dir)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                async with send:
                    return await fetch_hub(store, plan, mirror_config=mirror_cfg, options=options, events=send, snapshot=snapshot)
        finally:
            store.close()

    try:
        try:
            res = trio.run(main)
        except BaseExceptionGroup as eg:
            raise collapse_group(eg) from None
        finally:
            renderer.close()
    except Exception as exc:
        from autoglm.node.errors import AutoglmError

        if args.json and isinstance(exc, AutoglmError):
            print_json({"event": "error", "error": type(exc).__name__, "message": str(exc)})
        raise
    seconds = time.perf_counter() - t0
    r = res.fetch
    fetched = sum(r.bytes_by_source.values())
    if args.json:
        print_json({"event": "done", "path": str(res.path), "commit": res.snapshot.commit, "trust": res.trust,
                    "files": [f.path for f in res.files], "bytes_total": r.bytes_total, "bytes_by_source": r.bytes_by_source,
                    "received_by_source": r.received_by_source, "refetched_bytes": r.refetched_bytes, "seconds": round(seconds, 3)})
    else:
        console.print(f"[green]done[/]: {len(res.files)} files, {human_bytes(r.bytes_total)} in {res.path} "
                      f"({human_bytes(fetched)} fetched in {seconds:.1f}s); hub-attested, commit {res.snapshot.commit}")
        for sid, n in sorted(r.bytes_by_source.items()):
            console.print(f"  {sid}: {human_bytes(n)}")
    return 0
