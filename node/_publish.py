"""Turning a model directory into a manifest: walk, plan pieces, hash.

Strategy for speed: every byte is read once into one of a few fixed buffers.
A helper thread feeds each buffer to SHA-256 while the reading thread feeds the
same buffer to the piece BLAKE3 hashers; both hash functions and ``readinto``
release the GIL, so on two cores the slower hash (SHA-256) runs back to back
and sets the pace. Memory is NBUF x CHUNK whatever the model size.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fnmatch
import hashlib
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from autoglm.protocol import (
    DEFAULT_MAX_PIECE_SIZE,
    AutoglmError,
    ConfigError,
    FileEntry,
    Manifest,
    NeedMoreData,
    Piece,
    RemoteProtocolError,
    Requirements,
    Variant,
    cdc_candidates,
    cdc_cut,
    cdc_params_for,
    check_path,
    check_unique_paths,
    gguf_tensor_spans,
    plan_fixed,
    plan_runs,
    plan_safetensors,
    safetensors_header_length,
    safetensors_tensor_spans,
    zip_member_spans,
)
from autoglm.protocol._gguf import GGUF_MAX_HEADER, GGUF_PREAMBLE

if TYPE_CHECKING:
    from autoglm.protocol import CdcParams

__all__ = ["VariantSpec", "build_manifest", "hash_file", "list_model_files", "plan_file", "plan_read"]

CHUNK = 4 * 1024 * 1024
NBUF = 4
CDC_BLOCK = 4 * 1024 * 1024

ProgressFn = Callable[[int], None]


def list_model_files(root: Path, exclude: Iterable[Path] = (), skipped: list[str] | None = None) -> list[str]:
    """Relative POSIX paths of the regular files under ``root``, sorted.

    Hidden files and directories (``.git``, ``.cache``) are skipped. Symlinks to
    files are followed (Hugging Face cache snapshots are symlinks to blobs).
    ``skipped``, when given, receives what was left out (hidden folders end in ``/``).
    """
    excluded = {p.resolve() for p in exclude}
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        if skipped is not None:
            skipped.extend((base / d).relative_to(root).as_posix() + "/" for d in sorted(dirnames) if d.startswith("."))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            full = base / fn
            if fn.startswith(".") or full.resolve() in excluded:
                if skipped is not None:
                    skipped.append(full.relative_to(root).as_posix())
                continue
            try:
                st = full.stat()
            except OSError as exc:
                raise ConfigError(f"cannot read {full}: {exc.strerror}") from exc
            if stat.S_ISREG(st.st_mode):
                out.append(full.relative_to(root).as_posix())
            elif skipped is not None:
                skipped.append(full.relative_to(root).as_posix())
    out.sort(key=lambda s: s.encode())
    try:
        for p in out:
            check_path(p)
        check_unique_paths(out)
    except RemoteProtocolError as exc:
        raise ConfigError(f"cannot publish {root}: {exc}") from exc
    return out


def plan_file(path: Path, size: int, max_piece: int) -> list[tuple[int, int]]:
    """Piece spans for one file (docs/manifest.md, "Piece planning").

    Tensor-aligned for .safetensors (an invalid one is an error) and GGUF,
    member-aligned for zip archives (PyTorch checkpoints), content-defined
    chunks for everything else and for the bytes between tensors or members.
    A GGUF or zip file that does not parse is planned as generic bytes.
    """
    with open(path, "rb") as f:

        def read(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(n)

        return plan_read(read, size, max_piece, path.suffix == ".safetensors", str(path))


def plan_read(read: Callable[[int, int], bytes], size: int, max_piece: int, safetensors: bool, where: str) -> list[tuple[int, int]]:
    """:func:`plan_file` of bytes given by ``read(offset, n)`` (``publish hf://`` plans small files from memory)."""
    if safetensors:
        try:
            n = safetensors_header_length(read(0, 8), size)
            header = read(8, n)
            return plan_safetensors(size, n, safetensors_tensor_spans(header, size), max_piece)
        except RemoteProtocolError as exc:
            raise ConfigError(f"{where} is not a valid safetensors file: {exc}") from exc
    params = cdc_params_for(max_piece)

    def gap(off: int, n: int) -> list[tuple[int, int]]:
        return plan_fixed(n, max_piece) if params is None else plan_cdc_file(read, off, n, params)

    magic = read(0, 4)
    if magic == b"GGUF":
        with contextlib.suppress(RemoteProtocolError):
            return _plan_gguf(read, size, max_piece, gap)
    elif magic == b"PK\x03\x04":
        with contextlib.suppress(RemoteProtocolError):
            (cd_off, cd_len), members = zip_member_spans(read, size)
            return plan_runs(size, members, max_piece, gap, cuts=(cd_off, cd_off + cd_len))
    if params is None:
        return plan_fixed(size, max_piece)
    return plan_cdc_file(read, 0, size, params)


def plan_cdc_file(
    read: Callable[[int, int], bytes], offset: int, length: int, params: CdcParams, block: int = CDC_BLOCK
) -> list[tuple[int, int]]:
    """The CDC plan of ``length`` bytes at ``offset`` (protocol/_cdc.py), hashed on several cores.

    Blocks of ``block`` bytes, each with the 31 bytes before it, go to a
    thread pool (numpy releases the GIL); at most two per worker are in
    memory at once. The result is the same as ``plan_cdc_reader``'s.
    """
    if length <= params.min_size:  # one piece by the rule; no hashing (nor numpy) needed
        return [(offset, length)] if length else []
    cands: list[int] = []
    strict: list[bool] = []
    workers = max(1, min(4, os.cpu_count() or 1))
    pending: collections.deque[concurrent.futures.Future[tuple[list[int], list[bool]]]] = collections.deque()

    def drain() -> None:
        c, st = pending.popleft().result()
        cands.extend(c)
        strict.extend(st)

    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cdc") as pool:
        pos, tail = 0, b""
        while pos < length:
            n = min(block, length - pos)
            chunk = read(offset + pos, n)
            if len(chunk) != n:
                raise ConfigError("a file changed while it was being published")
            buf = tail + chunk
            pending.append(pool.submit(cdc_candidates, buf, pos - len(tail), params))
            tail = buf[-31:]
            pos += n
            if len(pending) >= 2 * workers:
                drain()
        while pending:
            drain()
    return [(offset + o, n) for o, n in cdc_cut(length, cands, strict, params)]


def _plan_gguf(
    read: Callable[[int, int], bytes], size: int, max_piece: int, gap: Callable[[int, int], list[tuple[int, int]]]
) -> list[tuple[int, int]]:
    need = min(size, 1024 * 1024)
    while True:
        try:
            _, tensors = gguf_tensor_spans(read(0, need), size)
        except NeedMoreData as more:
            if need >= size or need >= GGUF_MAX_HEADER:
                raise RemoteProtocolError("GGUF header runs past the end of the file") from None
            need = min(size, GGUF_MAX_HEADER, max(more.need, 2 * need))
            continue
        # the preamble (magic, version, tensor and key counts) changes whenever a key is added
        return plan_runs(size, tensors, max_piece, gap, cuts=(GGUF_PREAMBLE,))


def hash_file(path: Path, spans: list[tuple[int, int]], progress: ProgressFn | None = None) -> tuple[bytes, list[bytes]]:
    """SHA-256 of the whole file and BLAKE3 of each span, reading every byte once."""
    sha = hashlib.sha256()
    full: queue.Queue[memoryview | None] = queue.Queue()
    free: queue.Queue[bytearray] = queue.Queue()
    bufs = [bytearray(CHUNK) for _ in range(NBUF)]
    owner = {id(b): b for b in bufs}
    for b in bufs:
        free.put(b)
    errors: list[BaseException] = []

    def sha_worker() -> None:
        try:
            while (mv := full.get()) is not None:
                sha.update(mv)
                free.put(owner[id(mv.obj)])
        except BaseException as exc:  # handed to the reading thread
            errors.append(exc)
            free.put(bufs[0])

    worker = threading.Thread(target=sha_worker, name="sha256", daemon=True)
    worker.start()
    hashes: list[bytes] = []
    ends = [off + length for off, length in spans]
    piece_i, hasher, pos = 0, blake3.blake3(), 0
    try:
        with open(path, "rb", buffering=0) as f:
            while True:
                buf = free.get()
                if errors:
                    raise errors[0]
                n = f.readinto(buf)
                if not n:
                    free.put(buf)
                    break
                mv = memoryview(buf)[:n]
                full.put(mv)
                i = 0
                while i < n:
                    if piece_i >= len(ends):
                        raise ConfigError(f"{path} grew while it was being published")
                    take = min(ends[piece_i] - pos, n - i)
                    hasher.update(mv[i : i + take])
                    i += take
                    pos += take
                    if pos == ends[piece_i]:
                        hashes.append(hasher.digest())
                        hasher = blake3.blake3()
                        piece_i += 1
                if progress is not None:
                    progress(n)
    finally:
        full.put(None)
        worker.join()
    if errors:
        raise errors[0]
    if piece_i != len(ends):
        raise ConfigError(f"{path} shrank while it was being published")
    return sha.digest(), hashes


@dataclass(frozen=True, slots=True)
class VariantSpec:
    """A variant as the publisher states it: file globs and requirements."""

    name: str
    patterns: tuple[str, ...]
    requirements: Requirements = Requirements()


def _resolve_variants(specs: Iterable[VariantSpec], paths: list[str]) -> tuple[Variant, ...]:
    out = []
    for spec in specs:
        files = [p for p in paths if any(fnmatch.fnmatchcase(p, pat) for pat in spec.patterns)]
        if not files:
            raise ConfigError(f"variant {spec.name!r} matches no files ({', '.join(spec.patterns)})")
        out.append(Variant(spec.name, tuple(files), spec.requirements))
    return tuple(out)


def build_manifest(
    root: Path,
    *,
    name: str,
    version: str,
    publisher: str,
    created_at: int,
    max_piece: int = DEFAULT_MAX_PIECE_SIZE,
    variants: Iterable[VariantSpec] = (),
    parent: bytes | None = None,
    exclude: Iterable[Path] = (),
    progress: ProgressFn | None = None,
) -> Manifest:
    """Hash every file under ``root`` and return the (unsigned) manifest."""
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory")
    paths = list_model_files(root, exclude)
    if not paths:
        raise ConfigError(f"{root} holds no files to publish")
    files = []
    for rel in paths:
        full = root / rel
        size = full.stat().st_size
        spans = plan_file(full, size, max_piece)
        sha, hashes = hash_file(full, spans, progress)
        pieces = tuple(Piece(o, n, h) for (o, n), h in zip(spans, hashes, strict=True))
        files.append(FileEntry(rel, size, sha, pieces))
    m = Manifest(
        name=name,
        version=version,
        created_at=created_at,
        publisher=publisher,
        files=tuple(files),
        variants=_resolve_variants(variants, paths),
        parent=parent,
        max_piece_size=max_piece,
    )
    try:
        m.validate()
    except AutoglmError as exc:
        raise ConfigError(f"cannot publish: {exc}") from exc
    return m
