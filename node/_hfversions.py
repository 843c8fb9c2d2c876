"""A version installed in the Hugging Face cache layout too (``update --hf-cache``, ``join --follow --hf-cache``).

Where the hub identity comes from. A version of a model published with
``publish hf://ORG/REPO@REV`` reaches a node two ways:

* a MANIFEST file with its ``M.agm.hub.json`` beside it: the signed
  provenance (node/hub/_publish.py) gives repo, revision, commit and every
  file's Hub identity;
* by name (``update NAME``, ``join --follow NAME``): a peer sends the signed
  manifest the name record points at, and no provenance travels with it.
  The hub identity is then read from the signed manifest itself, as the
  gateway's name lookup does (node/hub/_names.py): its name is
  ``hf:ORG/REPO`` and its version the 40-hex commit, both inside the
  publisher's signature. No new field: every manifest keeps its format and
  its id. The *revision* is the follower's: the name record is the fleet's
  moving ref, and ``refs/<revision>`` is the local name huggingface_hub
  resolves (``--hf-revision``; default the revision this root last pinned for
  the repo, else ``main``). A file's blob name (its etag) is its SHA-256 for
  an LFS file (signed in the manifest) and its git blob id, computed from
  the verified bytes, otherwise. Which files are LFS is git's rule, read from
  the version's own ``.gitattributes`` (``filter=lfs`` patterns; the Hub's
  default patterns when it has none), and every file of 10 MiB or more (the
  Hub takes no larger file outside LFS). The blob name matters only to a
  later *online* huggingface_hub (it names a blob by the etag the Hub sends);
  offline loading goes through ``refs/`` and ``snapshots/`` only.

The install is a list of steps, as the switch of ``current`` is
(node/_versions.py): blobs (hard links to the verified version files: one
copy of the bytes), the tree listing and the snapshot links, all before
``current`` moves; ``refs/<revision>`` is replaced last (temp file beside
``refs/``, rename). A kill at any point leaves ``refs/<revision>`` naming a
complete snapshot: the old one or the new one (tests/update kill a process
after each step).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoglm.node._versions import Forget, HubPin, Step, VersionSet, plan_switch
from autoglm.node.errors import ConfigError, IntegrityError, StorageError
from autoglm.protocol import SignedManifest

if TYPE_CHECKING:
    from autoglm.node.hub._api import HubFile

__all__ = ["HfCache", "HubTarget", "hub_files", "hub_repo_of", "hub_target", "plan_hf_install", "plan_hf_switch"]

_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REVISION = re.compile(r"[A-Za-z0-9._-][A-Za-z0-9._/-]{0,127}")
_LFS_MIN = 10 * 1024 * 1024  # the Hub refuses a file this large outside LFS
_SMALL_MAX = 64 << 20  # a non-LFS file is read whole to name its blob; nothing the Hub keeps in git is larger
# The patterns the Hub's repository template marks filter=lfs (for a version without .gitattributes).
_HUB_DEFAULT_LFS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle",
    "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tar.*", "*.tflite", "*.tgz", "*.wasm", "*.xz",
    "*.zip", "*.zst", "*tfevents*",
)


@dataclass(frozen=True, slots=True)
class HfCache:
    """``--hf-cache``: each new version also goes into the Hugging Face cache at ``cache``.

    ``revision``: the ref to move (``--hf-revision``); None for the provenance's, else the root's last pin's,
    else ``main``. ``provenance``: the checked ``.hub.json`` of a MANIFEST file (node/hub/_publish.Provenance).
    """

    cache: Path
    revision: str | None = None
    provenance: Any = None

    def to_wire(self) -> dict[str, Any]:
        return {"cache": str(self.cache), "revision": self.revision}

    @classmethod
    def from_wire(cls, v: Any) -> HfCache:
        """The control request's ``hf_cache`` (ConfigError when malformed)."""
        if not isinstance(v, dict) or not isinstance(v.get("cache"), str) or not Path(v["cache"]).is_absolute():
            raise ConfigError("update: hf_cache is {'cache': ABSOLUTE_DIR, 'revision': REV or null}")
        rev = v.get("revision")
        if rev is not None and not isinstance(rev, str):
            raise ConfigError("update: hf_cache revision is a string")
        return cls(Path(v["cache"]), check_revision(rev) if rev is not None else None)


def check_revision(rev: str) -> str:
    if not _REVISION.fullmatch(rev) or ".." in rev.split("/") or rev.endswith("/") or "//" in rev:
        raise ConfigError(f"--hf-revision {rev!r} is not a branch or tag name")
    return rev


@dataclass(frozen=True, slots=True)
class HubTarget:
    """Where one version goes: ``<cache>/models--ORG--REPO``, ``snapshots/<commit>``, ``refs/<revision>``."""

    cache: Path
    repo: str
    revision: str
    commit: str

    @property
    def pin(self) -> HubPin:
        return HubPin(str(self.cache), self.repo, self.revision, self.commit)

    @property
    def repo_dir(self) -> Path:
        from autoglm.node.hub._cache import repo_dir

        return repo_dir(self.cache, self.repo)


def hub_target(signed: SignedManifest, hf: HfCache, vs: VersionSet) -> HubTarget:
    """The version's place in the cache, from the provenance or the signed manifest; ConfigError before any fetch."""
    m = signed.manifest
    prov = hf.provenance
    if prov is not None:
        return HubTarget(hf.cache, prov.repo, hf.revision or prov.revision, prov.commit)
    repo = hub_repo_of(m.name)
    if repo is None:
        raise ConfigError(f"--hf-cache: {m.name!r} was not published from the Hub (publish hf://ORG/REPO names "
                          "it hf:ORG/REPO); give the MANIFEST with its .hub.json instead")
    if not _COMMIT.fullmatch(m.version):
        raise ConfigError(f"--hf-cache: {m.name} version {m.version!r} is not a Hub commit (40 hex digits)")
    revision = hf.revision or _last_revision(vs, repo) or "main"
    return HubTarget(hf.cache, repo, check_revision(revision), m.version)


def hub_repo_of(name: str) -> str | None:
    """``ORG/REPO`` of a name ``hf:ORG/REPO`` (what ``publish hf://`` names its manifests), else None."""
    repo = name.removeprefix("hf:")
    return repo if name.startswith("hf:") and _REPO.fullmatch(repo) else None


def _last_revision(vs: VersionSet, repo: str) -> str | None:
    for d in vs.history():
        pin = vs.hub_pin(d)
        if pin is not None and pin.repo == repo:
            return pin.revision
    return None


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _lfs_patterns(version_dir: Path) -> tuple[str, ...]:
    try:
        text = (version_dir / ".gitattributes").read_text(errors="replace")
    except FileNotFoundError:
        return _HUB_DEFAULT_LFS
    except OSError as exc:
        raise StorageError(f"cannot read {version_dir / '.gitattributes'}: {exc.strerror}") from exc
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            out.append(parts[0])
    return tuple(out)


def _is_lfs(path: str, size: int, patterns: tuple[str, ...]) -> bool:
    if size >= _LFS_MIN:
        return True
    name = path.rsplit("/", 1)[-1]
    for pat in patterns:
        pat = pat.removeprefix("/")
        if fnmatch.fnmatchcase(path if "/" in pat else name, pat) or ("/" in pat and fnmatch.fnmatchcase(path, pat + "/*")):
            return True
    return False


def hub_files(signed: SignedManifest, hf: HfCache, version_dir: Path) -> tuple[HubFile, ...]:
    """Every file's Hub identity: the provenance's, else from the verified version files (see the module doc)."""
    from autoglm.node.hub._api import HubFile

    if hf.provenance is not None:
        return tuple(hf.provenance.files)
    patterns = _lfs_patterns(version_dir)
    out = []
    for f in signed.manifest.files:
        if _is_lfs(f.path, f.size, patterns):
            sha = f.sha256.hex()
            out.append(HubFile(f.path, f.size, _git_blob_id(_lfs_pointer(sha, f.size)), sha))
            continue
        try:
            data = (version_dir / f.path).read_bytes() if f.size <= _SMALL_MAX else b""
        except OSError as exc:
            raise StorageError(f"cannot read {version_dir / f.path}: {exc.strerror}") from exc
        if len(data) != f.size or hashlib.sha256(data).digest() != f.sha256:
            raise IntegrityError(f"{version_dir / f.path} is not the verified file the manifest lists")
        out.append(HubFile(f.path, f.size, _git_blob_id(data), None))
    return tuple(out)


def plan_hf_install(t: HubTarget, files: tuple[HubFile, ...], version_dir: Path) -> tuple[list[Step], Step]:
    """The steps before ``current`` moves (blobs, tree, snapshot) and the one after it (the ref).

    Each blob is a hard link to the verified version file (a copy across file
    systems); the snapshot links are made only when every blob is final; the
    ref is replaced whole, last.
    """
    from autoglm.node.hub._cache import blob_name, link_snapshot, write_ref, write_tree
    from autoglm.node.hub._publish import link_blob

    repo_dir = t.repo_dir

    def blobs() -> None:
        try:
            (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
            for f in files:
                link_blob(version_dir / f.path, repo_dir / blob_name(f))
        except OSError as exc:
            raise StorageError(f"cannot write the Hugging Face cache blobs in {repo_dir}: {exc.strerror}") from exc

    def snapshot() -> None:
        link_snapshot(repo_dir, t.commit, files)

    return (
        [("blobs", blobs), ("tree", lambda: write_tree(repo_dir, t.commit, files)), ("snapshot", snapshot)],
        ("ref", lambda: write_ref(repo_dir, t.revision, t.commit)),
    )


def plan_hf_switch(vs: VersionSet, dirname: str, keep: int, t: HubTarget, files: tuple[HubFile, ...],
                   forget: Forget | None = None) -> list[Step]:
    """Every step of an update with ``--hf-cache``, in order: the pin (``ROOT/hf-cache.json``, so ``rollback``
    knows the version's commit), the cache's blobs, tree and snapshot, the switch of ``current``, the ref."""
    before, ref = plan_hf_install(t, files, vs.path_for(dirname))
    return [("pin", lambda: vs.pin_hub(dirname, t.pin)), *before,
            *plan_switch(vs.root, dirname, vs.history(), keep, forget), ref]
