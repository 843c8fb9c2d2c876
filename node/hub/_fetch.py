"""``fetch hf://ORG/REPO[@REV]``: a hub snapshot through the fetch engine, into the HF cache or a folder.

Theory of operation
-------------------
1. :func:`~._api.resolve_snapshot` pins the revision to a commit and gets
   the file list with each file's identity, cross-checked across endpoints.
2. The files become an *unsigned* manifest (:func:`hub_manifest`): fixed
   pieces whose BLAKE3 hashes are unknown, file paths as they will lie under
   the output (``blobs/<etag>`` in the cache, repo paths in ``--local-dir``).
   Its id depends only on the commit's files, so a rerun resumes it.
3. The endpoints are mirror sources of that commit (every URL is
   ``/{repo}/resolve/{commit}/{path}``), scored and switched by the engine.
   Each piece is hashed as it arrives and the hash recorded (resume and
   later sharing work per piece); before a file is moved into place it is
   checked whole against its LFS SHA-256 or git blob id
   (:attr:`Download.file_check`, hashed in byte order while the file
   arrives: ``_verify.py``). A mismatch discards the file's pieces and
   raises IntegrityError naming the endpoints that sent them.
4. Then the snapshot links and the ref (cache), or the download metadata
   (``--local-dir``). Files already there (from huggingface_hub or an earlier
   run) are checked the same way and kept.

Trust: *hub-attested*. The identities come from the endpoints (over TLS for
the public Hub); nobody signed them. Such a manifest is never announced to
peers (the store lists only signed manifests for the swarm).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from autoglm.node._engine import Fetch, FetchOptions, FetchResult, collapse_group
from autoglm.node._mirrors import MirrorConfig, MirrorSource
from autoglm.node._progress import Event
from autoglm.node._store import UNKNOWN_HASH, Store
from autoglm.node.errors import ConfigError
from autoglm.protocol import FileEntry, Manifest, Piece
from autoglm.protocol._pieces import plan_fixed

from ._api import HubFile, HubRef, RepoSnapshot, file_url, resolve_snapshot
from ._cache import (
    blob_name,
    hub_cache_dir,
    link_snapshot,
    local_dir_metadata,
    repo_folder,
    write_ref,
    write_tree,
)
from ._verify import Tap, Verifier

__all__ = ["PIECE_SIZE", "HubFetchPlan", "HubFetchResult", "fetch_hub", "hub_manifest", "select_files"]

PIECE_SIZE = 8 << 20
TRUST = "hub-attested"


@dataclass(frozen=True, slots=True)
class HubFetchPlan:
    """Everything one hub fetch needs, built once by the CLI (or a gateway later)."""

    ref: HubRef
    endpoints: tuple[str, ...]
    token: str | None = field(default=None, repr=False)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    local_dir: Path | None = None
    cache_dir: Path | None = None  # default: hub_cache_dir()
    piece_size: int = PIECE_SIZE
    write_tree: bool = True  # trees/<commit>.json; False when the snapshot given is part of the commit (the gateway)


@dataclass(frozen=True, slots=True)
class HubFetchResult:
    snapshot: RepoSnapshot
    path: Path  # the snapshot folder, or --local-dir
    files: tuple[HubFile, ...]  # the files selected
    fetch: FetchResult
    trust: str = TRUST


def _pattern(p: str) -> str:
    return p + "*" if p.endswith("/") else p


def select_files(files: Sequence[HubFile], include: Sequence[str], exclude: Sequence[str]) -> list[HubFile]:
    """``--include``/``--exclude`` globs as ``hf download`` applies them (fnmatch on the repo path)."""
    inc = [_pattern(p) for p in include]
    exc = [_pattern(p) for p in exclude]
    return [
        f for f in files
        if (not inc or any(fnmatch.fnmatch(f.path, p) for p in inc)) and not any(fnmatch.fnmatch(f.path, p) for p in exc)
    ]


def hub_manifest(snapshot: RepoSnapshot, layout: dict[str, HubFile], piece_size: int) -> Manifest:
    """The unsigned manifest of a snapshot: ``layout`` maps output path -> file; piece hashes unknown."""
    entries = []
    for path in sorted(layout):
        f = layout[path]
        sha = bytes.fromhex(f.sha256) if f.sha256 else bytes(32)
        pieces = tuple(Piece(o, n, UNKNOWN_HASH) for o, n in plan_fixed(f.size, piece_size))
        entries.append(FileEntry(path, f.size, sha, pieces))
    ref = snapshot.ref
    return Manifest(
        name=f"{ref.hub}:{ref.repo}"[:128], version=snapshot.commit[:128], created_at=0,
        publisher=TRUST, files=tuple(entries), max_piece_size=piece_size,
    )


def _layout(plan: HubFetchPlan, snapshot: RepoSnapshot) -> tuple[Path, dict[str, HubFile], dict[str, HubFile]]:
    """(output dir, manifest path -> file for the whole commit, manifest path -> file for the selection)."""
    selected = select_files(snapshot.files, plan.include, plan.exclude)
    if not selected:
        raise ConfigError(f"no file of {snapshot.ref.repo}@{snapshot.commit[:12]} matches --include/--exclude")
    if plan.local_dir is not None:
        return plan.local_dir, {f.path: f for f in snapshot.files}, {f.path: f for f in selected}
    repo_dir = repo_folder(plan.cache_dir or hub_cache_dir(), snapshot.ref)
    # Identical files share one blob, as in huggingface_hub's cache.
    return repo_dir, {blob_name(f): f for f in snapshot.files}, {blob_name(f): f for f in selected}


async def fetch_hub(
    store: Store,
    plan: HubFetchPlan,
    *,
    mirror_config: MirrorConfig | None = None,
    options: FetchOptions | None = None,
    events: trio.MemorySendChannel[Event] | None = None,
    snapshot: RepoSnapshot | None = None,
    taps: Mapping[str, Tap] | None = None,
) -> HubFetchResult:
    """Fetch a hub snapshot (see the module docstring). ``events`` is not closed here.

    ``taps`` (repository path -> :class:`~._verify.Tap`) see each fetched file's bytes in order
    as the whole-file check reads them (``publish hf://`` hashes its manifest's pieces there).
    """
    if snapshot is None:
        snapshot = await resolve_snapshot(plan.ref, plan.endpoints, plan.token)
    out_dir, whole, wanted = _layout(plan, snapshot)
    manifest = hub_manifest(snapshot, whole, plan.piece_size)
    if plan.local_dir is None and plan.write_tree:
        # Written before any byte, as huggingface_hub does: an interrupted snapshot reads as incomplete offline.
        await trio.to_thread.run_sync(write_tree, out_dir, snapshot.commit, snapshot.files)
    download = await trio.to_thread.run_sync(store.open_download, manifest, out_dir, list(wanted))
    verifier = Verifier(download, [whole[f.path] for f in manifest.files], taps)
    download.file_check = verifier.check
    download.drop_behind = False  # the verifier reads committed pieces back, then drops them

    def adopt_present() -> None:
        for fi in download.wanted_files:
            if fi not in download.complete_files and (out_dir / manifest.files[fi].path).exists():
                download.adopt(fi)

    await trio.to_thread.run_sync(adopt_present)
    repo_path = {p: f.path for p, f in whole.items()}
    headers = {"Authorization": f"Bearer {plan.token}"} if plan.token else {}
    group: list[MirrorSource] = []
    for ep in snapshot.endpoints:
        MirrorSource(
            ep + "/", headers=headers, config=mirror_config, peers=group,
            url_for=lambda p, ep=ep: file_url(ep, snapshot.ref, snapshot.commit, repo_path[p]),  # type: ignore[misc]
        )
    send, recv = trio.open_memory_channel[Event](256)
    try:
        async with trio.open_nursery() as nursery:
            # Progress names the repository's paths, not blob hashes.
            nursery.start_soon(verifier.relay, recv, events, {p: f.path for p, f in whole.items()})
            async with send:
                result = await Fetch(store, download, group, send, options).run()
    except BaseExceptionGroup as eg:
        raise collapse_group(eg) from None
    files = tuple(sorted(wanted.values(), key=lambda f: f.path))
    if plan.local_dir is None:
        selected = select_files(snapshot.files, plan.include, plan.exclude)
        path = await trio.to_thread.run_sync(link_snapshot, out_dir, snapshot.commit, selected)
        await trio.to_thread.run_sync(write_ref, out_dir, snapshot.ref.revision, snapshot.commit)
        files = tuple(selected)
    else:
        await trio.to_thread.run_sync(local_dir_metadata, out_dir, snapshot.commit, files)
        path = out_dir
    return HubFetchResult(snapshot, path, files, result)
