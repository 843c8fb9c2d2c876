"""``autoglm-node publish hf://ORG/REPO@REV --key KEY``: flags and the command (called from cli/_manifest_cmds.py)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

__all__ = ["add_publish_hub_args", "cmd_publish_hub", "hf_cache_after_fetch", "prepare_hf_cache_fetch"]


def add_publish_hub_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("publish hf://ORG/REPO[@REV] (a signed manifest of a Hub commit)")
    g.add_argument("--endpoint", action="append", default=[], metavar="URL",
                   help="another endpoint serving the repository (repeatable; HF_ENDPOINT or the public Hub comes first)")
    g.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: @REV in the reference, else main)")
    g.add_argument("--token-file", type=Path, metavar="FILE", help="access token file (default: HF_TOKEN, then huggingface_hub's stored token)")
    g.add_argument("--cache-dir", type=Path, metavar="DIR", help="the Hugging Face cache to read and fill (default: HF_HUB_CACHE, HF_HOME/hub, ...)")
    g.add_argument("--name-publish", action="store_true",
                   help="also point the signed name record NAME at the new manifest, via the `join` node running on this data directory")
    g.add_argument("--seq", type=int, metavar="N", help="name record sequence number with --name-publish (default: the manifest's created_at)")


def cmd_publish_hub(args: argparse.Namespace) -> int:
    import trio

    from autoglm.node._engine import FetchOptions, collapse_group
    from autoglm.node._keys import load_private_key
    from autoglm.node._manifests import default_manifest_path
    from autoglm.node._mirrors import MirrorConfig
    from autoglm.node._progress import Event
    from autoglm.node.cli._common import console, err_console, human_bytes, print_json
    from autoglm.node.errors import ConfigError

    from ._api import default_endpoints, load_token, parse_ref, resolve_snapshot
    from ._publish import HubPublishResult, publish_hub

    ref = parse_ref(args.dir, args.revision)
    if args.version is not None:
        raise ConfigError("publish hf://… takes no --version: the version is the commit the revision resolves to")
    if args.variants or args.parent or args.cert_chain:
        raise ConfigError("--variants, --parent and --cert-chain are not supported with publish hf://… yet")
    endpoints = default_endpoints(ref.hub, args.endpoint)
    token = load_token(args.token_file)
    cache = args.cache_dir.expanduser().resolve() if args.cache_dir is not None else None
    from autoglm.node.cli._manifest_cmds import _refuse_public_key

    _refuse_public_key(args.key)
    key = load_private_key(args.key)
    t0 = time.perf_counter()

    async def main() -> HubPublishResult:
        snapshot = await resolve_snapshot(ref, endpoints, token)
        for why in snapshot.dropped:
            err_console.print(f"[yellow]warning:[/] endpoint left out: {why}")
        out: Path = args.out or default_manifest_path(args.data_dir, args.name or f"hf:{ref.repo}", snapshot.commit)
        if await trio.to_thread.run_sync(out.exists) and not args.force:
            raise ConfigError(f"{out} already exists; pass --force to overwrite it")
        if not args.json:
            err_console.print(f"{ref} is commit {snapshot.commit} ({len(snapshot.files)} files, "
                              f"{len(snapshot.endpoints)} endpoint(s) agree)")
        send, recv = trio.open_memory_channel[Event](256)

        async def drain() -> None:
            async with recv:
                async for _ in recv:
                    pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            async with send:
                return await publish_hub(
                    ref, snapshot.endpoints, key, out, data_dir=args.data_dir, token=token, name=args.name,
                    cache_dir=cache, max_piece=args.max_piece,
                    mirror_config=MirrorConfig(max_request_bytes=16 << 20),
                    options=FetchOptions(max_consecutive_failures=50), events=send, snapshot=snapshot,
                )

    try:
        res = trio.run(main)
    except BaseExceptionGroup as eg:
        raise collapse_group(eg) from None
    seconds = time.perf_counter() - t0
    m = res.signed.manifest
    fetched = sum(res.fetch.bytes_by_source.values()) if res.fetch else 0
    name_rec: dict[str, Any] | None = None
    if args.name_publish:
        from autoglm.node._control_client import request

        req = {"op": "name_publish", "key": str(args.key.resolve()), "manifest": str(res.manifest_path.resolve()), "seq": args.seq}
        for line in request(args.data_dir, req, timeout=60):
            if line.get("event") == "error":
                raise ConfigError(f"name-publish: {line.get('message')}")
            name_rec = line
    if args.json:
        print_json({"manifest": str(res.manifest_path), "provenance": str(res.sidecar), "id": res.signed.id.hex(),
                    "name": m.name, "version": m.version, "repo": ref.repo, "commit": res.snapshot.commit,
                    "endpoints": list(res.provenance.endpoints), "mirrors": list(res.provenance.mirrors),
                    "files": len(m.files), "pieces": m.piece_count, "size": m.total_size,
                    "from_cache": res.from_cache, "fetched_bytes": fetched, "read_again_bytes": res.read_again,
                    "seconds": round(seconds, 3),
                    "name_record": name_rec})
    else:
        where = "read from the HF cache" if res.from_cache else f"fetched {human_bytes(fetched)} into the HF cache"
        console.print(
            f"published [bold]{m.name}[/] {m.version}: {len(m.files)} files, {m.piece_count} pieces, "
            f"{human_bytes(m.total_size)} ({where}; every file matched its Hub hash) in {seconds:.1f}s\n"
            f"manifest   {res.manifest_path}\nprovenance {res.sidecar} (signed; join --seed / fetch use its web seeds)\n"
            f"id {res.signed.id.hex()}", soft_wrap=True)
        for u in res.provenance.mirrors:
            console.print(f"web seed   {u}", soft_wrap=True)
        if name_rec is not None:
            console.print(f"name record {name_rec['key']} -> {name_rec['manifest_id'][:16]} (seq {name_rec['seq']})")
    return 0


def prepare_hf_cache_fetch(args: argparse.Namespace) -> Any:
    """``fetch M.agm --hf-cache``: the checked provenance; sets ``--out`` to the hidden files folder if not given."""
    from autoglm.node._manifests import load_signed_manifest
    from autoglm.node.errors import ConfigError

    from ._cache import hub_cache_dir
    from ._publish import files_dir, load_provenance, sidecar_path

    if args.manifest.startswith(("http://", "https://")):
        raise ConfigError("--hf-cache needs a manifest file with its .hub.json beside it (written by publish hf://)")
    path = Path(args.manifest)
    side = sidecar_path(path)
    if not side.is_file():
        raise ConfigError(f"--hf-cache needs {side} (the provenance publish hf://… writes beside the manifest)")
    signed = load_signed_manifest(path)
    prov = load_provenance(side, signed)
    cache = (args.cache_dir or hub_cache_dir()).expanduser().resolve()
    if args.out is None:
        args.out = files_dir(cache, prov.repo, prov.commit)
    if not args.variant or args.variant == "all":
        from autoglm.node._manifests import check_manifest
        from autoglm.node.cli._manifest_cmds import trust_from_args

        check_manifest(signed, trust_from_args(args))  # nothing is recorded under an untrusted manifest
        reuse_cached_blobs(args.data_dir, cache, prov, signed, Path(args.out))
    return cache, prov


def reuse_cached_blobs(data_dir: Path, cache: Path, prov: Any, signed: Any, out: Path) -> list[str]:
    """Blobs the Hugging Face cache already holds become the fetch's files: not fetched again, not stored twice.

    Each ``blobs/<etag>`` of the right size whose file is not in ``out`` yet is
    hard-linked to ``out/<path>`` and recorded in the store only if every piece
    matches the signed manifest (``Download.adopt``); one that does not is
    unlinked again and fetched as usual. A blob on another file system is left
    alone (a copy would not save the disk). Returns the paths reused.
    """
    from autoglm.node._store import Store

    from ._cache import repo_folder

    repo_dir = repo_folder(cache, prov.ref)
    entries = {e.path: e for e in signed.manifest.files}
    linked: list[str] = []
    for f in prov.files:
        blob, dst = repo_dir / "blobs" / f.etag, out / f.path
        e = entries.get(f.path)
        try:
            if e is None or e.size == 0 or dst.exists() or not blob.is_file() or blob.stat().st_size != e.size:
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.hardlink_to(blob)
        except OSError:
            continue
        linked.append(f.path)
    if not linked:
        return []
    store = Store(data_dir)
    try:
        download = store.open_download(signed, out, None)
        try:
            index = {e.path: fi for fi, e in enumerate(signed.manifest.files)}
            reused = [p for p in linked if download.adopt(index[p])]
        finally:
            download.close()
    finally:
        store.close()
    for p in set(linked) - set(reused):
        (out / p).unlink(missing_ok=True)  # not the signed bytes: fetched as usual
    return reused


def hf_cache_after_fetch(state: Any, out_dir: Path, files: list[str] | None) -> Path:
    from ._publish import write_hf_cache

    cache, prov = state
    return write_hf_cache(cache, prov, out_dir, files)
