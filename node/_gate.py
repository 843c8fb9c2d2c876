"""The gate before load: nothing reaches a loader until it passed the sandbox.

Per file, :func:`verify_path` picks a verifier by extension and magic bytes:

* ``.safetensors``: the safetensors module gets the header region only;
* ``.bin/.pt/.pth/.ckpt`` zip checkpoints: the host reads the zip central
  directory (Python's zipfile, names checked for traversal) and the pickle
  module gets ``data.pkl``; legacy (pre-zip) torch files are refused;
* ``.gguf``: the gguf module gets the header, key/values and tensor infos;
* ``.json``: a strict, size-limited JSON check on the host (no code runs);
* plain text data (tokenizer vocabularies, README) passes through;
* code (``.py``, ``.so``, ...) and anything unknown are refused.

Verdicts are cached in ``DATA_DIR/verify-cache.sqlite`` by (file SHA-256,
verifier pin, gate version); errors are never cached. The hash comes from
the manifest check or from a stat cache (device, inode, size, mtime); the
gate never hashes a file only to look up its verdict.

:func:`open_model` adds the manifest: signature and trust, SHA-256 of every
file, then the sandbox, then the fit check of the measured tensor bytes
against the device, and only then returns paths (and tensors on request).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import struct
import threading
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from autoglm.protocol import (
    ConfigError,
    IntegrityError,
    Manifest,
    TrustPolicy,
    decode_signed_manifest,
)
from autoglm.wasm_verify import (
    DEFAULT_LIMITS,
    SandboxLimits,
    Verdict,
    builtin_module,
    run_bytes,
    run_verifier,
)

from ._config import resolve_data_dir
from ._device import DeviceInfo, probe_device
from ._keys import TrustLike, as_trust_policy, load_trust_policy
from ._manifests import check_manifest, load_signed_manifest
from .errors import SandboxError, VerificationRefused

__all__ = [
    "GATE_VERSION",
    "ModelHandle",
    "ResolvedModel",
    "VerdictCache",
    "check_fit",
    "detect_kind",
    "open_model",
    "load_checked_manifest",
    "resolve_model",
    "resolve_model_path",
    "verify_path",
    "verify_tree",
]

#: Bumped whenever host-side checks change, so cached verdicts are redone.
GATE_VERSION = "gate-1"
MAX_PICKLE = 256 * 1024 * 1024
MAX_JSON = 64 * 1024 * 1024
#: Host budgets before the sandbox (docs/security.md): members of a checkpoint zip and
#: bytes of its central directory, JSON containers and values, JSON nesting.
MAX_ZIP_MEMBERS = 65_536
MAX_ZIP_DIRECTORY = 16 * 1024 * 1024
MAX_JSON_CONTAINERS = 1_000_000
MAX_JSON_VALUES = 4_000_000
HOST_PIN = "host"
#: LONG1 of torch's legacy magic number 0x1950A86A20F9469CFC6C, after PROTO 2.
_LEGACY_TORCH_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

_ZIP_EXT = {".bin", ".pt", ".pth", ".ckpt"}
_TEXT_EXT = {".txt", ".model", ".tiktoken", ".md", ".spm", ".vocab", ".merges", ".gitattributes", ".gitignore"}
_TEXT_NAMES = {"LICENSE", "LICENSE.txt", "README", "NOTICE", "USE_POLICY.md"}
_CODE_EXT = {".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".sh", ".exe", ".js", ".whl", ".egg"}
_MANIFEST_EXT = {".agm"}
_SKIP_DIRS = {".autoglm-partial", ".git", "__pycache__"}


def _host(kind: str, status: Literal["ok", "reject", "error"], reason: str = "", code: str | None = None) -> Verdict:
    return Verdict(status, kind, reason, code, pin=HOST_PIN)


def detect_kind(path: Path, head: bytes) -> str:
    """Which check a file gets: safetensors, torch_zip, pickle, gguf, json, text, manifest, code or unknown."""
    ext = path.suffix.lower()
    if ext == ".safetensors":
        return "safetensors"
    if ext == ".gguf" or head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == b"PK\x03\x04" and (ext in _ZIP_EXT or ext == ""):
        return "torch_zip"
    if ext in _ZIP_EXT or ext in {".pkl", ".pickle"}:
        return "pickle" if head[:1] == b"\x80" else "unknown"
    if ext == ".json":
        return "json"
    if ext in _MANIFEST_EXT:
        return "manifest"
    if ext in _CODE_EXT:
        return "code"
    if ext in _TEXT_EXT or path.name in _TEXT_NAMES:
        return "text"
    return "unknown"


# -- the verdict cache ---------------------------------------------------------------


class VerdictCache:
    """SQLite cache: (sha256, pin, gate version) -> verdict; (dev, ino, size, mtime) -> sha256."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (sha256 TEXT, pin TEXT, gate TEXT, verdict TEXT, PRIMARY KEY (sha256, pin, gate))"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS hashes (dev INTEGER, ino INTEGER, size INTEGER, mtime_ns INTEGER, sha256 TEXT,"
            " PRIMARY KEY (dev, ino, size, mtime_ns))"
        )

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> VerdictCache:
        return cls(data_dir / "verify-cache.sqlite")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, sha256: str, pin: str) -> Verdict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT verdict FROM verdicts WHERE sha256=? AND pin=? AND gate=?", (sha256, pin, GATE_VERSION)
            ).fetchone()
        return Verdict.from_value(json.loads(row[0])) if row else None

    def put(self, sha256: str, verdict: Verdict) -> None:
        if verdict.status == "error":
            return
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)",
                (sha256, verdict.pin, GATE_VERSION, json.dumps(verdict.to_value())),
            )

    def file_hash(self, st: os.stat_result) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT sha256 FROM hashes WHERE dev=? AND ino=? AND size=? AND mtime_ns=?",
                (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns),
            ).fetchone()
        return str(row[0]) if row else None

    def put_file_hash(self, st: os.stat_result, sha256: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)", (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, sha256)
            )


def sha256_file(path: Path, chunk: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- per-format host work ------------------------------------------------------------


def _check_member_name(name: str) -> str | None:
    if not name or "\\" in name or "\0" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return f"zip member {name!r} has an absolute, drive or backslash path"
    parts = PurePosixPath(name).parts
    if any(p in ("..", ".") for p in parts) or "//" in name:
        return f"zip member {name!r} escapes the archive (path traversal)"
    return None


_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")


def _zip_directory_problem(path: Path) -> str | None:
    """Walk the zip's central directory with a member budget, before zipfile builds anything.

    Strategy: zipfile makes a ZipInfo per member (about 500 bytes of Python
    each) while it reads the directory, so a tiny archive of empty members
    costs hundreds of MiB. The end record gives the directory's size; the walk
    counts members itself (the record's count is 16 bits and may lie).
    """
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail_len = min(size, _EOCD.size + 0xFFFF)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + _EOCD.size > len(tail):
            return "not a zip archive (no end of central directory record)"
        _, _, _, _, count, cd_size, _, _ = _EOCD.unpack_from(tail, at)
        eocd_pos = size - tail_len + at
        cd_end = eocd_pos
        if (count == 0xFFFF or cd_size == 0xFFFFFFFF) and at >= _EOCD64_LOCATOR.size:
            sig, _, eocd64_pos, _ = _EOCD64_LOCATOR.unpack_from(tail, at - _EOCD64_LOCATOR.size)
            if sig == b"PK\x06\x07" and eocd64_pos < eocd_pos:
                f.seek(eocd64_pos)
                rec = f.read(_EOCD64.size)
                if len(rec) == _EOCD64.size and rec[:4] == b"PK\x06\x06":
                    count, cd_size = _EOCD64.unpack(rec)[6], _EOCD64.unpack(rec)[7]
                    cd_end = eocd64_pos
        if count > MAX_ZIP_MEMBERS:
            return f"zip archive declares {count} members; the limit is {MAX_ZIP_MEMBERS}"
        if cd_size > MAX_ZIP_DIRECTORY or cd_size > cd_end:
            return f"zip central directory of {cd_size} bytes is over the {MAX_ZIP_DIRECTORY}-byte limit or the file"
        f.seek(cd_end - cd_size)
        cd = f.read(cd_size)
    pos = members = 0
    while pos + _CENTRAL.size <= len(cd):
        if cd[pos : pos + 4] != b"PK\x01\x02":
            return "malformed zip central directory"
        fields = _CENTRAL.unpack_from(cd, pos)
        members += 1
        if members > MAX_ZIP_MEMBERS:
            return f"zip archive has more than {MAX_ZIP_MEMBERS} members"
        pos += _CENTRAL.size + fields[10] + fields[11] + fields[12]
    return None


def _torch_zip_pickle(path: Path) -> tuple[bytes, int] | Verdict:
    """data.pkl and the total size of the data/* storages, or a refusal."""
    try:
        problem = _zip_directory_problem(path)
    except OSError as exc:
        return _host("torch_zip", "reject", f"not a readable zip archive: {exc}", "bad_zip")
    if problem is not None:
        return _host("torch_zip", "reject", problem, "limit" if "limit" in problem else "bad_zip")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        return _host("torch_zip", "reject", f"not a readable zip archive: {exc}", "bad_zip")
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        for n in names:
            problem = _check_member_name(n)
            if problem:
                return _host("torch_zip", "reject", problem, "path_traversal")
        if len(set(names)) != len(names):
            return _host("torch_zip", "reject", "zip archive lists a member twice", "duplicate")
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1:
            return _host("torch_zip", "reject", "a torch checkpoint has exactly one top-level directory", "bad_zip")
        root = roots.pop()
        try:
            info = zf.getinfo(f"{root}/data.pkl")
        except KeyError:
            return _host("torch_zip", "reject", f"no {root}/data.pkl in the archive", "bad_zip")
        if info.file_size > MAX_PICKLE or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            return _host("torch_zip", "reject", "data.pkl is too large or uses an unsupported compression", "limit")
        try:
            pkl = zf.read(info)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            return _host("torch_zip", "reject", f"cannot read data.pkl: {exc}", "bad_zip")
        storage = sum(i.file_size for i in infos if i.filename.startswith(f"{root}/data/"))
    return pkl, storage


def _strict_json(path: Path, size: int) -> Verdict:
    if size > MAX_JSON:
        return _host("json", "reject", f"JSON file of {size} bytes is over the {MAX_JSON}-byte limit", "limit")

    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate key")
        return dict(pairs)

    def no_constants(name: str) -> Any:
        raise ValueError(f"non-standard constant {name}")

    data = path.read_bytes()
    problem = _json_shape_problem(data)
    if problem is not None:
        return _host("json", "reject", problem, "limit")
    try:
        json.loads(data.decode("utf-8"), object_pairs_hook=no_dupes, parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return _host("json", "reject", f"not strict JSON: {exc}", "bad_json")
    return _host("json", "ok")


def _json_shape_problem(data: bytes) -> str | None:
    """Bound the objects json would build, at C speed, before it builds any.

    Strategy: every array or object starts with ``[`` or ``{`` and every
    other value follows a ``,`` or ``:`` (or is the first), so counting those
    bytes bounds what the parser allocates. Brackets and commas inside
    strings count too: the bounds are upper bounds, which only a file far
    larger than any config or tokenizer reaches. Nesting is bounded by json's
    own recursion limit (a RecursionError is a refusal).
    """
    containers = data.count(b"[") + data.count(b"{")
    if containers > MAX_JSON_CONTAINERS:
        return f"JSON has up to {containers} arrays and objects; the limit is {MAX_JSON_CONTAINERS}"
    values = containers + data.count(b",") + data.count(b":") + 1
    if values > MAX_JSON_VALUES:
        return f"JSON has up to {values} values; the limit is {MAX_JSON_VALUES}"
    return None


def _header_region(path: Path, kind: str, size: int, limits: SandboxLimits) -> Verdict:
    """Run the safetensors or GGUF module on the file's leading bytes only.

    For safetensors the first read already covers the header its length
    field announces (bounded), so a check usually takes one round; the
    sandbox, not this hint, decides whether that length is acceptable.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        first = 1 << 20
        if kind == "safetensors":
            announced = int.from_bytes(os.pread(fd, 8, 0), "little")
            first = 8 + min(announced, limits.max_input)
        return run_verifier(builtin_module(kind), lambda n: os.pread(fd, n, 0), size, first_read=max(first, 8), limits=limits)
    finally:
        os.close(fd)


def _sandbox(path: Path, kind: str, size: int, limits: SandboxLimits) -> Verdict:
    if kind in ("safetensors", "gguf"):
        return _header_region(path, kind, size, limits)
    if kind == "pickle":
        if size > MAX_PICKLE:
            return _host("pickle", "reject", "pickle file over the size limit", "limit")
        with path.open("rb") as f:
            head = f.read(64)
        if head[2:14] == _LEGACY_TORCH_MAGIC:
            return _host(
                "pickle",
                "reject",
                "legacy (pre-1.6, non-zip) torch serialization is not supported; re-save it with a current torch or as safetensors",
                "legacy_torch",
            )
        return run_bytes(builtin_module("pickle"), path.read_bytes(), limits=limits)
    if kind == "torch_zip":
        got = _torch_zip_pickle(path)
        if isinstance(got, Verdict):
            return got
        pkl, storage_bytes = got
        v = run_bytes(builtin_module("pickle"), pkl, limits=limits)
        v = Verdict(v.status, "torch_zip", v.reason, v.reason_code, v.tensor_count, v.param_count, v.dtype_bytes, v.pin, v.fuel_used, v.elapsed_s)
        if v.ok and v.tensor_bytes != storage_bytes:
            return _host(
                "torch_zip",
                "reject",
                f"the pickle references {v.tensor_bytes} storage bytes but the archive holds {storage_bytes}",
                "storage_mismatch",
            )
        return v
    if kind == "json":
        return _strict_json(path, size)
    if kind == "text":
        return _host("text", "ok", "data file, passed through")
    if kind == "manifest":
        return _host("manifest", "ok", "signed manifest (checked separately)")
    if kind == "code":
        return _host("code", "reject", "executable code in a model directory is never loaded", "code_file")
    return _host(kind, "reject", "unknown file type; not a safetensors, torch, GGUF, JSON or text file", "unknown_type")


def _pin_for(kind: str) -> str:
    mod = {"safetensors": "safetensors", "gguf": "gguf", "pickle": "pickle", "torch_zip": "pickle"}.get(kind)
    return builtin_module(mod).pin if mod else HOST_PIN


def verify_path(
    path: Path,
    *,
    cache: VerdictCache | None = None,
    sha256: str | None = None,
    limits: SandboxLimits = DEFAULT_LIMITS,
) -> Verdict:
    """The sandbox verdict for one file. Never raises for hostile content.

    ``sha256`` (hex): the file's hash when the caller already computed it
    (e.g. against the manifest); it keys the verdict cache. Without it the
    cache is consulted only if this inode was hashed before.
    """
    path = Path(path)
    try:
        st = path.stat()
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as exc:
        return _host("unknown", "error", f"cannot read: {exc.strerror}")
    kind = detect_kind(path, head)
    if cache is None or kind in ("text", "manifest", "code", "unknown"):
        return _sandbox(path, kind, st.st_size, limits)
    # Strategy: the cache key needs the file's SHA-256, but hashing a large
    # file costs far more than the header-only sandbox check. So the cache is
    # used only when the hash is already known: passed in (the manifest check
    # computed it) or remembered for this exact inode, size and mtime.
    if sha256 is not None:
        cache.put_file_hash(st, sha256)
    digest = sha256 or cache.file_hash(st)
    if digest is None:
        return _sandbox(path, kind, st.st_size, limits)
    pin = _pin_for(kind)
    hit = cache.get(digest, pin)
    if hit is not None:
        return hit
    v = _sandbox(path, kind, st.st_size, limits)
    if v.pin == pin or v.pin == HOST_PIN:
        cache.put(digest, v)
    return v


def iter_model_files(root: Path) -> Iterator[Path]:
    """Files under a model directory in a stable order, skipping staging areas."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            yield Path(dirpath) / name


def verify_tree(
    path: Path, *, cache: VerdictCache | None = None, limits: SandboxLimits = DEFAULT_LIMITS, hashes: dict[Path, str] | None = None
) -> list[tuple[Path, Verdict]]:
    """Verdicts for a file, or for every file of a directory."""
    path = Path(path)
    files = [path] if path.is_file() else list(iter_model_files(path))
    hashes = hashes or {}
    return [(f, verify_path(f, cache=cache, limits=limits, sha256=hashes.get(f))) for f in files]


# -- fit and open_model -------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def check_fit(tensor_bytes: int, device: DeviceInfo) -> str | None:
    """Why the measured tensor bytes cannot be loaded on the device, or None."""
    if tensor_bytes <= device.ram_total or (device.accel_mem and tensor_bytes <= device.accel_mem):
        return None
    where = f"{_gib(device.ram_total)} RAM"
    if device.gpus:
        where += f" and {_gib(device.accel_mem)} on the largest GPU"
    return f"the tensors need {_gib(tensor_bytes)} but the device has {where}"


@dataclass(frozen=True, slots=True, repr=False)
class ModelHandle:
    """A model that passed every check. ``files`` are safe to hand to a loader.

    ``root`` is the model directory (or file); pass ``str(handle.root)`` to
    ``from_pretrained``. ``verdicts`` holds each file's sandbox verdict,
    ``manifest`` the signed manifest that vouched for the files (None with
    ``require_signature=False``), ``tensor_bytes`` the measured tensor bytes.
    """

    root: Path
    files: tuple[Path, ...]
    verdicts: tuple[tuple[Path, Verdict], ...]
    manifest: Manifest | None
    tensor_bytes: int
    tensors: dict[str, Any] | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        # A manifest's repr lists every piece hash: name what it is instead.
        signed = f"{self.manifest.name}@{self.manifest.version} signed by {self.manifest.publisher}" if self.manifest else "unsigned"
        loaded = f", tensors={len(self.tensors)} loaded" if self.tensors is not None else ""
        return (
            f"ModelHandle(root={str(self.root)!r}, files={len(self.files)}, manifest={signed!r}, "
            f"tensor_bytes={self.tensor_bytes}{loaded})"
        )


def _find_manifest(root: Path) -> Path | None:
    if root.is_file():
        return None
    cands = sorted(root.glob("*.agm")) + sorted((root / ".autoglm").glob("*.agm"))
    return cands[0] if len(cands) == 1 else None


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """Where a model lives and, for a completed download, its signed manifest bytes."""

    path: Path
    signed_manifest: bytes | None = None


def resolve_model(name_or_path: str | os.PathLike[str], data_dir: Path | None, *, stored_manifest_for_paths: bool = False) -> ResolvedModel:
    """A path that exists, else NAME[@VERSION] of a completed download in DATA_DIR's store.

    ``stored_manifest_for_paths``: a directory without a manifest beside its
    files that this data directory fetched gets the download's stored
    manifest too (``open_model``; ``verify PATH`` stays a sandbox-only check).
    """
    p = Path(name_or_path).expanduser()
    if p.exists():
        root = p.resolve()
        if stored_manifest_for_paths and data_dir is not None and root.is_dir() and _find_manifest(root) is None:
            from autoglm.node._store import find_download_at  # the store owns its schema

            # A directory this node fetched: its stored signed manifest vouches for it.
            return ResolvedModel(root, find_download_at(data_dir, root))
        return ResolvedModel(root)
    if data_dir is not None:
        from autoglm.node._store import find_completed_download  # the store owns its schema

        name, _, version = str(name_or_path).partition("@")
        found = find_completed_download(data_dir, name, version)
        if found is not None and found[0].exists():
            return ResolvedModel(found[0].resolve(), found[1])
    raise ConfigError(f"{name_or_path!s} is neither a path nor a completed download in the local store")


def resolve_model_path(name_or_path: str | os.PathLike[str], data_dir: Path | None) -> Path:
    return resolve_model(name_or_path, data_dir).path


def load_checked_manifest(resolved: ResolvedModel, manifest_path: Path | None, trust: TrustPolicy) -> Manifest | None:
    """The manifest that vouches for the model (file given, found beside it, or stored), checked against ``trust``."""
    mpath = manifest_path or _find_manifest(resolved.path)
    if mpath is not None:
        return check_manifest(load_signed_manifest(mpath), trust)
    if resolved.signed_manifest is not None:
        return check_manifest(decode_signed_manifest(resolved.signed_manifest), trust)
    return None


def check_manifest_files(root: Path, manifest: Manifest, files: Iterable[Path]) -> dict[Path, str]:
    """SHA-256 of every present file against the manifest; returns path -> hex digest.

    Raises IntegrityError on a mismatch and VerificationRefused for a file the
    manifest does not list (an unsigned file is never loaded).
    """
    listed = {f.path: f for f in manifest.files}
    digests: dict[Path, str] = {}
    for p in files:
        rel = p.relative_to(root).as_posix() if root.is_dir() else p.name
        if p.suffix in _MANIFEST_EXT or rel.startswith(".autoglm/"):
            continue
        entry = listed.get(rel)
        if entry is None:
            raise VerificationRefused(str(p), "file is not listed in the signed manifest")
        if p.stat().st_size != entry.size:
            raise IntegrityError(f"{p}: size {p.stat().st_size} differs from the manifest's {entry.size}")
        digest = sha256_file(p)
        if digest != entry.sha256.hex():
            raise IntegrityError(f"{p}: SHA-256 does not match the signed manifest")
        digests[p] = digest
    if not digests:
        raise VerificationRefused(str(root), "no file of the manifest is present")
    return digests


def open_model(
    name_or_path: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    trust: TrustLike | None = None,
    manifest_path: str | os.PathLike[str] | None = None,
    device: DeviceInfo | None = None,
    require_signature: bool = True,
    load_tensors: bool = False,
    limits: SandboxLimits = DEFAULT_LIMITS,
) -> ModelHandle:
    """Verified local paths of a model, after signature, hashes, sandbox and fit.

    ``name_or_path`` is a file, a model directory (its manifest is
    ``manifest_path``, or the one ``*.agm`` beside the files), or
    NAME[@VERSION] of a completed download in ``data_dir``'s store, whose
    stored signed manifest is used. ``data_dir`` None is the default data
    directory ($AUTOGLM_DATA_DIR or the platform's), as for the CLI.
    ``trust`` is a policy, a key file, key bytes or several keys; None uses
    the data directory's trust store (``autoglm-node trust add``).

    Raises SignatureError/TrustError (manifest), IntegrityError (hashes),
    VerificationRefused (sandbox or fit), ConfigError (nothing to open).
    With ``require_signature=False`` and no manifest, only the sandbox and the
    fit check run. ``load_tensors`` loads ``.safetensors`` files as numpy
    arrays when the safetensors package is installed.
    """
    ddir = resolve_data_dir(data_dir)
    resolved = resolve_model(name_or_path, ddir, stored_manifest_for_paths=True)
    root = resolved.path
    mpath = None if manifest_path is None else Path(manifest_path).expanduser()
    files = [root] if root.is_file() else list(iter_model_files(root))
    policy = _trust_for_open(trust, ddir)
    manifest: Manifest | None = None
    hashes: dict[Path, str] = {}
    if policy is not None:
        manifest = load_checked_manifest(resolved, mpath, policy)
    elif mpath is not None or _find_manifest(root) is not None or resolved.signed_manifest is not None:
        raise ConfigError(
            "a manifest was found but no publisher is trusted: pass trust=KEY.pub (--trust KEY.pub) "
            "or run `autoglm-node trust add KEY.pub`"
        )
    if manifest is not None:
        hashes = check_manifest_files(root, manifest, files)
        files = [f for f in files if f in hashes]
    elif require_signature:
        raise ConfigError(f"no signed manifest for {root}; pass manifest_path or require_signature=False")
    # Reading a model never creates a data directory: the verdict cache is
    # used only where the data directory already exists.
    exists = ddir.is_dir()
    cache = VerdictCache.in_data_dir(ddir) if exists else None
    try:
        verdicts = [(f, verify_path(f, cache=cache, limits=limits, sha256=hashes.get(f))) for f in files]
    finally:
        if cache is not None:
            cache.close()
    for f, v in verdicts:
        if not v.ok:
            raise VerificationRefused(str(f), f"{v.kind}: {v.reason or v.status}")
    tensor_bytes = sum(v.tensor_bytes for _, v in verdicts)
    problem = check_fit(tensor_bytes, device if device is not None else probe_device(ddir if exists else None))
    if problem:
        raise VerificationRefused(str(root), problem)
    tensors = _load_tensors([f for f, v in verdicts if v.kind == "safetensors"]) if load_tensors else None
    return ModelHandle(root, tuple(files), tuple(verdicts), manifest, tensor_bytes, tensors)


def _trust_for_open(trust: TrustLike | None, data_dir: Path) -> TrustPolicy | None:
    """The explicit policy, else the trust store's when it trusts anyone, else None."""
    if trust is not None:
        return as_trust_policy(trust, data_dir)[0]
    stored = load_trust_policy(data_dir)
    return stored if stored.keys or stored.roots else None


def _load_tensors(paths: list[Path]) -> dict[str, Any]:
    try:
        from safetensors.numpy import load_file
    except ImportError as exc:
        raise SandboxError("load_tensors needs the safetensors package") from exc
    out: dict[str, Any] = {}
    for p in paths:
        out.update(load_file(str(p)))
    return out
