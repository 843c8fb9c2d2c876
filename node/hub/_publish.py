"""``publish hf://ORG/REPO@REV --key KEY``: a signed manifest of one Hub commit, for fleets.

Theory of operation
-------------------
1. The revision is resolved to a commit and the file list (size, git blob id,
   LFS SHA-256) with the hub client, cross-checked across every endpoint as
   ``fetch hf://`` does (``_api.resolve_snapshot``).
2. The bytes come from the local Hugging Face cache when the snapshot of that
   commit is complete there; otherwise they are fetched first through the
   engine into the cache (``_fetch.fetch_hub``: verified per file, resumable).
3. Each file is read once: the manifest's piece plan (``autoglm.node._publish``:
   tensor-aligned for safetensors), its BLAKE3 piece hashes and its SHA-256
   come from that read, and the file is checked against the Hub's identity in
   the same pass (LFS: the SHA-256 is the Hub's; small files: the git blob id,
   SHA-1 of ``blob <size>\\0`` + bytes). Any disagreement refuses the publish.
4. The manifest (format v1, unchanged) is named ``hf:ORG/REPO`` (or
   ``--name``) with the commit as its version, and signed.
5. Beside it, ``M.agm.hub.json``: the *provenance* (hub, repo, revision,
   commit, endpoints, every file's Hub identity) and the mirror base URLs
   ``{endpoint}/{repo}/resolve/{commit}/``, bound to the manifest id and
   signed by the same key under its own domain tag. ``join --seed M.agm`` and
   ``fetch M.agm`` read it to use the Hub as web seed, and ``fetch M.agm
   --hf-cache`` to write the Hugging Face cache layout. No token is ever
   written there.

Why a sidecar and not a manifest field: manifest v1 is strict (older
decoders refuse an unknown key), and nothing in the provenance is needed to
verify bytes: the signed manifest already pins every file's SHA-256 (which
*is* the Hub's LFS hash) and the git blob id of a small file is a function of
its verified bytes. The repo and commit are in the signed name and version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from autoglm.node._engine import FetchOptions, FetchResult
from autoglm.node._mirrors import MirrorConfig
from autoglm.node._progress import Event
from autoglm.node._publish import hash_file, plan_file, plan_read
from autoglm.node._store import Store
from autoglm.node.errors import ConfigError, IntegrityError, SignatureError, StorageError
from autoglm.protocol import (
    FileEntry,
    Manifest,
    Piece,
    RemoteProtocolError,
    SignedManifest,
    key_id,
    plan_safetensors,
    safetensors_header_length,
    safetensors_tensor_spans,
    sign_manifest,
)
from autoglm.protocol._signing import verify_signature

from ._api import HubFile, HubRef, RepoSnapshot, resolve_snapshot
from ._cache import blob_name, hub_cache_dir, link_snapshot, repo_folder, write_ref, write_tree
from ._fetch import HubFetchPlan, fetch_hub

__all__ = [
    "DOMAIN_PROVENANCE",
    "SIDECAR_SUFFIX",
    "HubPublishResult",
    "Provenance",
    "build_hub_manifest",
    "load_provenance",
    "mirror_base",
    "publish_hub",
    "sidecar_mirrors",
    "sidecar_path",
    "with_sidecar_mirrors",
    "snapshot_complete",
    "write_hf_cache",
]

DOMAIN_PROVENANCE = b"autoglm-node/hub-provenance/v1\x00"
SIDECAR_SUFFIX = ".hub.json"
_SMALL = 64 << 20  # non-LFS files up to this size are hashed from one in-memory read
_MAX_SIDECAR = 64 << 20


def git_blob_id(data: bytes | memoryview) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + bytes(data)).hexdigest()


def mirror_base(endpoint: str, repo: str, commit: str) -> str:
    """The web seed for the engine: ``{endpoint}/{repo}/resolve/{commit}/`` (file paths are appended)."""
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{commit}/"


def sidecar_path(manifest: Path) -> Path:
    return manifest.with_name(manifest.name + SIDECAR_SUFFIX)


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where a published manifest's bytes came from; signed by the manifest's publisher."""

    manifest_id: bytes
    hub: str
    repo: str
    revision: str
    commit: str
    endpoints: tuple[str, ...]
    mirrors: tuple[str, ...]
    files: tuple[HubFile, ...]
    public_key: bytes
    signature: bytes = field(default=b"", repr=False)

    def signed_value(self) -> dict[str, Any]:
        return {
            "v": 1,
            "manifest": self.manifest_id.hex(),
            "hub": self.hub,
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "endpoints": list(self.endpoints),
            "mirrors": list(self.mirrors),
            "files": [{"path": f.path, "size": f.size, "blob_id": f.blob_id, "sha256": f.sha256} for f in self.files],
            "key": self.public_key.hex(),
        }

    def signed_bytes(self) -> bytes:
        return json.dumps(self.signed_value(), sort_keys=True, separators=(",", ":")).encode()

    def encode(self) -> bytes:
        return json.dumps({**self.signed_value(), "sig": self.signature.hex()}, sort_keys=True, indent=1).encode() + b"\n"

    @property
    def ref(self) -> HubRef:
        return HubRef(self.hub, self.repo, self.revision)


def _sign_provenance(p: Provenance, key: Ed25519PrivateKey) -> Provenance:
    sig = key.sign(DOMAIN_PROVENANCE + p.signed_bytes())
    return Provenance(p.manifest_id, p.hub, p.repo, p.revision, p.commit, p.endpoints, p.mirrors, p.files, p.public_key, sig)


def _bad(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path} is not a valid hub provenance file: {what}")


def load_provenance(path: Path, signed: SignedManifest) -> Provenance:
    """Read and check ``M.agm.hub.json``: well formed, for this manifest, signed by its signer."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_SIDECAR + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > _MAX_SIDECAR:
        raise _bad(path, "too large")
    try:
        v = json.loads(data)
        files = tuple(
            HubFile(str(e["path"]), int(e["size"]), e["blob_id"], e["sha256"]) for e in v["files"]
        )
        p = Provenance(
            bytes.fromhex(v["manifest"]), str(v["hub"]), str(v["repo"]), str(v["revision"]), str(v["commit"]),
            tuple(str(x) for x in v["endpoints"]), tuple(str(x) for x in v["mirrors"]), files,
            bytes.fromhex(v["key"]), bytes.fromhex(v["sig"]),
        )
        if v["v"] != 1 or set(v) != {*p.signed_value(), "sig"}:
            raise ValueError("unknown version or fields")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _bad(path, str(exc)) from exc
    if p.manifest_id != signed.id:
        raise _bad(path, f"it describes manifest {p.manifest_id.hex()[:16]}…, not {signed.id.hex()[:16]}…")
    if p.public_key != signed.public_key:
        raise _bad(path, "it is signed by another key than the manifest")
    try:
        verify_signature(p.public_key, p.signature, DOMAIN_PROVENANCE, p.signed_bytes())
    except SignatureError as exc:
        raise SignatureError(f"{path}: the provenance signature is invalid") from exc
    for u in p.mirrors:
        s = urllib.parse.urlsplit(u)
        if s.scheme not in ("http", "https") or not s.hostname or s.username or s.password:
            raise _bad(path, f"mirror {u!r} is not a plain http(s) URL")
    by_path = {f.path: f for f in signed.manifest.files}
    for f in p.files:
        m = by_path.get(f.path)
        if m is None or m.size != f.size or (f.sha256 is not None and m.sha256.hex() != f.sha256):
            raise _bad(path, f"{f.path!r} disagrees with the manifest")
    return p


def sidecar_mirrors(manifest: str) -> list[str]:
    """The Hub web seeds of a manifest file with a valid sidecar beside it; [] for none (or a URL)."""
    if manifest.startswith(("http://", "https://")):
        return []
    path = Path(manifest)
    side = sidecar_path(path)
    if not side.is_file():
        return []
    from autoglm.node._manifests import load_signed_manifest

    return list(load_provenance(side, load_signed_manifest(path)).mirrors)


def with_sidecar_mirrors(manifest: str, mirrors: Sequence[str]) -> tuple[str, ...]:
    """``mirrors`` and then the manifest's Hub web seeds (``join --seed``, ``fetch``), each once."""
    if manifest.startswith(("http://", "https://")) or not Path(manifest + SIDECAR_SUFFIX).is_file():
        return tuple(mirrors)
    out = list(mirrors)
    out += [u for u in sidecar_mirrors(manifest) if u not in out]
    return tuple(out)


# -- hashing ---------------------------------------------------------------


def _hash_small(path: Path, spans: list[tuple[int, int]]) -> tuple[bytes, list[bytes], str]:
    """SHA-256, piece BLAKE3s and git blob id from one read (small files)."""
    with open(path, "rb") as f:
        data = f.read(_SMALL + 1)
    mv = memoryview(data)
    return hashlib.sha256(data).digest(), [blake3.blake3(mv[o : o + n]).digest() for o, n in spans], git_blob_id(data)


def hash_hub_file(path: Path, f: HubFile, max_piece: int, progress: Callable[[int], None] | None = None) -> FileEntry:
    """Plan and hash one file for the manifest, checking it against its Hub identity in the same read."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
    if size != f.size:
        raise IntegrityError(f"{f.path}: {size} bytes in the cache, the Hub says {f.size}")
    spans = plan_file(path, size, max_piece) if size else []
    if f.sha256 is None and size <= _SMALL:
        sha, hashes, blob = _hash_small(path, spans)
        if progress is not None:
            progress(size)
    else:
        sha, hashes = hash_file(path, spans, progress)
        blob = None
        if f.sha256 is None:  # a big non-LFS file (rare): its blob id needs SHA-1, a second read
            h = hashlib.sha1(b"blob %d\0" % size)
            with open(path, "rb") as fh:
                while chunk := fh.read(4 << 20):
                    h.update(chunk)
            blob = h.hexdigest()
    if f.sha256 is not None and sha.hex() != f.sha256:
        raise IntegrityError(f"{f.path}: SHA-256 {sha.hex()} but the Hub's LFS SHA-256 is {f.sha256}; refusing to publish")
    if f.sha256 is None and blob != f.blob_id:
        raise IntegrityError(f"{f.path}: git blob id {blob} but the Hub's is {f.blob_id}; refusing to publish")
    return FileEntry(f.path, size, sha, tuple(Piece(o, n, h) for (o, n), h in zip(spans, hashes, strict=True)))


_MAX_TAP_HEADER = 64 << 20


class PieceTap:
    """The manifest pieces of one safetensors LFS file, hashed from the fetch's own in-order read (a cold publish).

    The fetch's whole-file SHA-256 check reads every byte in order (``_verify``);
    this sees the same bytes: the header gives the tensor-aligned plan, then each
    piece's BLAKE3. Anything unexpected (bytes out of order, a header that does not
    parse or is too big) leaves it without an entry, and the file is read again.
    """

    def __init__(self, f: HubFile, max_piece: int) -> None:
        self.file = f
        self.max_piece = max_piece
        self.reset()

    def reset(self) -> None:
        self.pos = 0  # bytes seen
        self.done = 0  # bytes hashed into pieces
        self.failed = False
        self.head = bytearray()
        self.spans: list[tuple[int, int]] | None = None
        self.hashes: list[bytes] = []
        self.h = blake3.blake3()

    def feed(self, offset: int, data: bytes) -> None:
        if self.failed:
            return
        if offset != self.pos:
            self.failed = True
            return
        self.pos += len(data)
        if self.spans is None:
            self.head += data
            size = self.file.size
            try:
                if len(self.head) < 8:
                    return
                n = safetensors_header_length(bytes(self.head[:8]), size)
                if n > _MAX_TAP_HEADER:
                    raise RemoteProtocolError("header too large to plan from the stream")
                if len(self.head) < 8 + n:
                    return
                self.spans = plan_safetensors(size, n, safetensors_tensor_spans(bytes(self.head[8 : 8 + n]), size), self.max_piece)
            except RemoteProtocolError:
                self.failed = True
                return
            head, self.head = self.head, bytearray()
            self._hash(memoryview(head))
        else:
            self._hash(memoryview(data))

    def _hash(self, mv: memoryview) -> None:
        assert self.spans is not None
        while len(mv):
            if len(self.hashes) >= len(self.spans):
                self.failed = True
                return
            off, length = self.spans[len(self.hashes)]
            take = min(len(mv), off + length - self.done)
            self.h.update(mv[:take])
            self.done += take
            mv = mv[take:]
            if self.done == off + length:
                self.hashes.append(self.h.digest())
                self.h = blake3.blake3()

    def entry(self) -> FileEntry | None:
        """The manifest entry, once every byte was seen; None to read the file instead."""
        f = self.file
        if self.failed or self.spans is None or self.pos != f.size or len(self.hashes) != len(self.spans) or f.sha256 is None:
            return None
        pieces = tuple(Piece(o, n, h) for (o, n), h in zip(self.spans, self.hashes, strict=True))
        return FileEntry(f.path, f.size, bytes.fromhex(f.sha256), pieces)


class SmallTap:
    """A small file's manifest entry from the fetch's own in-order read (a cold publish): bytes kept in memory.

    Up to ``_SMALL`` bytes, the whole file is collected as the whole-file check
    reads it (``_verify``), then planned (``plan_read``: the same plan as
    ``plan_file`` from the cache file) and hashed from memory. Bytes out of
    order leave it without an entry, and the file is read again.
    """

    def __init__(self, f: HubFile, max_piece: int) -> None:
        self.file = f
        self.max_piece = max_piece
        self.reset()

    def reset(self) -> None:
        self.buf = bytearray()
        self.failed = False

    def feed(self, offset: int, data: bytes) -> None:
        if self.failed or offset != len(self.buf) or len(self.buf) + len(data) > self.file.size:
            self.failed = True
            return
        self.buf += data

    def entry(self) -> FileEntry | None:
        f = self.file
        if self.failed or len(self.buf) != f.size:
            return None
        data = bytes(self.buf)
        self.buf = bytearray()
        mv = memoryview(data)
        spans = plan_read(lambda o, n: data[o : o + n], f.size, self.max_piece, f.path.endswith(".safetensors"), f.path) if f.size else []
        sha = hashlib.sha256(data).digest()
        if f.sha256 is not None and sha.hex() != f.sha256:  # the fetch's check passed on these bytes: a bug if so
            return None
        return FileEntry(f.path, f.size, sha, tuple(Piece(o, n, blake3.blake3(mv[o : o + n]).digest()) for o, n in spans))


def build_hub_manifest(
    snap_dir: Path, snapshot: RepoSnapshot, *, name: str, publisher: str, created_at: int, max_piece: int,
    progress: Callable[[int], None] | None = None, hashed: dict[str, FileEntry] | None = None,
) -> Manifest:
    """The unsigned manifest of a complete snapshot folder (``snapshots/<commit>/``).

    ``hashed`` holds entries already made from the fetch's read (:class:`PieceTap`); the other files are read here.
    """
    files = sorted(snapshot.files, key=lambda f: f.path.encode())
    known = hashed or {}
    entries = tuple(known.get(f.path) or hash_hub_file(snap_dir / f.path, f, max_piece, progress) for f in files)
    m = Manifest(name=name, version=snapshot.commit, created_at=created_at, publisher=publisher, files=entries,
                 max_piece_size=max_piece)
    try:
        m.validate()
    except Exception as exc:
        raise ConfigError(f"cannot publish {snapshot.ref.repo}@{snapshot.commit[:12]}: {exc}") from exc
    return m


def snapshot_complete(repo_dir: Path, commit: str, files: Sequence[HubFile]) -> bool:
    """Every file of the commit linked in ``snapshots/<commit>/`` to a blob of the right size."""
    snap = repo_dir / "snapshots" / commit
    for f in files:
        try:
            if (snap / f.path).stat().st_size != f.size:
                return False
        except OSError:
            return False
    return True


# -- publish ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HubPublishResult:
    signed: SignedManifest
    manifest_path: Path
    provenance: Provenance
    sidecar: Path
    snapshot: RepoSnapshot
    from_cache: bool  # the snapshot was complete in the cache: no file bytes fetched
    fetch: FetchResult | None
    read_again: int = 0  # bytes read from the cache after the fetch to hash them (0 from a warm cache: one read)


async def publish_hub(
    ref: HubRef,
    endpoints: Sequence[str],
    key: Ed25519PrivateKey,
    out: Path,
    *,
    data_dir: Path,
    token: str | None = None,
    name: str | None = None,
    cache_dir: Path | None = None,
    max_piece: int,
    mirror_config: MirrorConfig | None = None,
    options: FetchOptions | None = None,
    events: trio.MemorySendChannel[Event] | None = None,
    snapshot: RepoSnapshot | None = None,
    progress: Callable[[int], None] | None = None,
) -> HubPublishResult:
    """Resolve, fetch if needed, hash, sign; write ``out`` and ``out.hub.json``."""
    if ref.hub != "hf":
        raise ConfigError("publish supports hf:// repositories (ModelScope: fetch ms:// --local-dir, then publish DIR)")
    for ep in endpoints:
        if urllib.parse.urlsplit(ep).username:
            raise ConfigError(f"endpoint {ep!r} carries credentials; use HF_TOKEN or --token-file (never written to a manifest)")
    if snapshot is None:
        snapshot = await resolve_snapshot(ref, endpoints, token)
    cache = cache_dir or hub_cache_dir()
    repo_dir = repo_folder(cache, ref)
    fetched: FetchResult | None = None
    from_cache = await trio.to_thread.run_sync(snapshot_complete, repo_dir, snapshot.commit, snapshot.files)
    hashed: dict[str, FileEntry] = {}
    if not from_cache:
        # The fetch's whole-file check reads each file once, in order: the safetensors pieces are hashed there too.
        # Small files (up to 64 MiB) are kept in memory as that read passes and planned and hashed there.
        taps: dict[str, PieceTap | SmallTap] = {}
        for f in snapshot.files:
            if f.sha256 is not None and f.path.endswith(".safetensors"):
                taps[f.path] = PieceTap(f, max_piece)
            elif f.size <= _SMALL:
                taps[f.path] = SmallTap(f, max_piece)
        store = await trio.to_thread.run_sync(Store, data_dir)
        try:
            plan = HubFetchPlan(ref=ref, endpoints=tuple(snapshot.endpoints), token=token, cache_dir=cache)
            res = await fetch_hub(store, plan, mirror_config=mirror_config, options=options, events=events, snapshot=snapshot,
                                  taps=taps)
            fetched = res.fetch
        finally:
            store.close()
        hashed = {p: e for p, t in taps.items() if (e := t.entry()) is not None}
        # Paths with the same bytes are one blob, fetched and read once: they share its entry.
        by_etag = {f.etag: hashed[f.path] for f in snapshot.files if f.path in hashed}
        for f in snapshot.files:
            if f.path not in hashed and f.etag in by_etag:
                hashed[f.path] = dataclasses.replace(by_etag[f.etag], path=f.path)
    read_again = 0 if from_cache else sum(f.size for f in snapshot.files if f.path not in hashed)
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    manifest = await trio.to_thread.run_sync(
        lambda: build_hub_manifest(
            repo_dir / "snapshots" / snapshot.commit, snapshot, name=name or f"hf:{ref.repo}", publisher=key_id(pub),
            created_at=int(time.time()), max_piece=max_piece, progress=progress, hashed=hashed,
        )
    )
    signed = sign_manifest(manifest, key)
    prov = _sign_provenance(
        Provenance(
            signed.id, ref.hub, ref.repo, ref.revision, snapshot.commit, tuple(snapshot.endpoints),
            tuple(mirror_base(ep, ref.repo, snapshot.commit) for ep in snapshot.endpoints),
            tuple(sorted(snapshot.files, key=lambda f: f.path.encode())), pub,
        ),
        key,
    )
    from autoglm.node._manifests import atomic_write, write_signed_manifest

    side = sidecar_path(out)
    await trio.to_thread.run_sync(write_signed_manifest, out, signed)
    await trio.to_thread.run_sync(atomic_write, side, prov.encode())
    return HubPublishResult(signed, out, prov, side, snapshot, from_cache, fetched, read_again)


# -- fetch M.agm --hf-cache --------------------------------------------------


def files_dir(cache: Path, repo: str, commit: str) -> Path:
    """Where ``fetch M.agm --hf-cache`` has the engine write (hidden in the repo folder; the blobs are hard links)."""
    return repo_folder(cache, HubRef("hf", repo, commit)) / ".autoglm-files" / commit


def link_blob(src: Path, dst: Path) -> None:
    """The cache blob ``dst`` becomes the verified file ``src``: a hard link (a copy across file systems).

    A link to ``src`` already there (made before the fetch or by an earlier run)
    is kept; anything else (an unverified blob, or a copy) is replaced atomically.
    """
    if dst.is_file() and (dst.stat().st_ino, dst.stat().st_dev) == (src.stat().st_ino, src.stat().st_dev):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.autoglm-tmp")
    tmp.unlink(missing_ok=True)
    try:
        tmp.hardlink_to(src)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    tmp.replace(dst)


def write_hf_cache(cache: Path, prov: Provenance, out_dir: Path, paths: Sequence[str] | None = None) -> Path:
    """Turn fetched files in ``out_dir`` into the HF cache layout: blobs by etag, snapshot links, ref, tree.

    Each blob is a hard link to the fetched file (one copy on disk), or a copy
    across file systems. A small file's git blob id is computed from its
    (already verified) bytes, not taken from the sidecar.
    """
    repo_dir = repo_folder(cache, prov.ref)
    wanted = [f for f in prov.files if paths is None or f.path in paths]
    try:
        (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
        write_tree(repo_dir, prov.commit, prov.files)
        for f in wanted:
            src = out_dir / f.path
            if f.sha256 is None:
                if src.stat().st_size > _SMALL:
                    raise IntegrityError(f"{f.path}: a non-LFS file over {_SMALL} bytes")
                blob = git_blob_id(src.read_bytes())
                if blob != f.blob_id:
                    raise IntegrityError(f"{f.path}: git blob id {blob}, the provenance says {f.blob_id}")
            link_blob(src, repo_dir / blob_name(f))
        snap = link_snapshot(repo_dir, prov.commit, wanted)
        write_ref(repo_dir, prov.revision, prov.commit)
    except OSError as exc:
        raise StorageError(f"cannot write the Hugging Face cache in {repo_dir}: {exc.strerror}") from exc
    return snap
