"""The Hugging Face cache layout and the ``--local-dir`` layout, written the way huggingface_hub writes them.

Cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``)::

    models--ORG--REPO/
        blobs/<etag>                  the file's bytes; etag = LFS SHA-256, else git blob id
        snapshots/<commit>/<path>     relative symlink to ../../blobs/<etag> (deeper paths: more ../)
        refs/<revision>               the commit the branch or tag pointed at (not for a commit)
        trees/<commit>.json           the file list (huggingface_hub >= 2 reads it offline to
                                      tell a complete snapshot from an interrupted one)

The blobs are the fetch engine's output files: the engine writes each into a
staging file and renames it to ``blobs/<etag>`` only once the whole file
verified, so a blob that exists is complete. Snapshot links are made only
after every wanted blob is final, and the ref last: an interrupted fetch
leaves no snapshot pointing at a missing blob, and the tree listing (written
first, like huggingface_hub does) tells an offline ``snapshot_download`` the
snapshot is incomplete.

``--local-dir DIR``: the files at ``DIR/<path>``, and per file
``DIR/.cache/huggingface/download/<path>.metadata`` (commit, etag, time), as
``hf download --local-dir`` writes them, so a later ``hf download`` into the
same folder sees the files as up to date.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from autoglm.node.errors import StorageError

from ._api import HubFile, HubRef

__all__ = [
    "hub_cache_dir", "link_snapshot", "local_dir_metadata", "repo_dir", "repo_folder", "snapshot_problem", "write_ref",
    "write_tree",
]


def hub_cache_dir() -> Path:
    """Where huggingface_hub looks: HF_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "huggingface" / "hub"


def repo_folder(cache: Path, ref: HubRef) -> Path:
    return repo_dir(cache, ref.repo)


def repo_dir(cache: Path, repo: str) -> Path:
    """``models--ORG--REPO`` under ``cache``."""
    return cache / ("models--" + repo.replace("/", "--"))


def blob_name(f: HubFile) -> str:
    return "blobs/" + f.etag


def _atomic_write(path: Path, text: str, tmp_dir: Path | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_tree(base: Path, commit: str, files: Iterable[HubFile]) -> None:
    """``trees/<commit>.json`` (format 1), the listing huggingface_hub caches per commit."""
    entries = {}
    for f in files:
        e: dict[str, object] = {"size": f.size, "blob_id": f.blob_id or f.etag}
        if f.lfs:
            e["lfs_sha256"] = f.sha256
            e["lfs_size"] = f.size
        if f.xet_hash is not None:
            e["xet_hash"] = f.xet_hash
        entries[f.path] = e
    data = {"format_version": 1, "files": {p: entries[p] for p in sorted(entries)}}
    try:
        _atomic_write(base / "trees" / f"{commit}.json", json.dumps(data, indent=1))
    except OSError as exc:
        raise StorageError(f"cannot write the tree listing in {base}: {exc.strerror}") from exc


def link_snapshot(repo_dir: Path, commit: str, files: Iterable[HubFile]) -> Path:
    """``snapshots/<commit>/<path>`` -> ``../../blobs/<etag>`` for every file whose blob is complete."""
    snap = repo_dir / "snapshots" / commit
    try:
        for f in files:
            blob = repo_dir / blob_name(f)
            if not blob.is_file() or blob.stat().st_size != f.size:
                raise StorageError(f"{blob} is missing or incomplete; not linking {f.path}")
            link = snap / f.path
            link.parent.mkdir(parents=True, exist_ok=True)
            target = os.path.relpath(blob, link.parent)
            if link.is_symlink() and os.readlink(link) == target:
                continue
            tmp = link.with_name(f".{link.name}.autoglm-link")
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(target, tmp)
            os.replace(tmp, link)
    except OSError as exc:
        raise StorageError(f"cannot write the snapshot in {snap}: {exc.strerror}") from exc
    return snap


def write_ref(repo_dir: Path, revision: str, commit: str) -> None:
    """``refs/<revision>`` holds the commit (no newline), as huggingface_hub writes it; none for a commit.

    Replaced whole by rename(2) from a temp file in the repo folder, not in
    ``refs/``: huggingface_hub reads every file under ``refs/`` as a ref, so a
    temp file left there by a killed process would be a ref to nothing
    (``hf cache scan`` then calls the repo corrupted).
    """
    if revision == commit:
        return
    path = repo_dir / "refs" / revision
    try:
        if path.is_file() and path.read_text() == commit:
            return
        _atomic_write(path, commit, tmp_dir=repo_dir)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc


def snapshot_problem(repo_dir: Path, commit: str) -> str | None:
    """Why ``snapshots/<commit>`` cannot be loaded offline (a file or blob missing or short), or None.

    With ``trees/<commit>.json`` every listed file must be there at its size
    (what huggingface_hub checks offline); without it, every link in the
    snapshot must reach a blob.
    """
    snap = repo_dir / "snapshots" / commit
    if not snap.is_dir():
        return f"{snap} is gone"
    try:
        listing = json.loads((repo_dir / "trees" / f"{commit}.json").read_bytes())
        files = listing["files"] if isinstance(listing, dict) and isinstance(listing.get("files"), dict) else None
    except (OSError, ValueError, KeyError):
        files = None
    try:
        if files is not None:
            for path, entry in files.items():
                size = entry.get("size") if isinstance(entry, dict) else None
                f = snap / path
                if not f.is_file() or (isinstance(size, int) and f.stat().st_size != size):
                    return f"{f} is missing or incomplete"
            return None
        for f in snap.rglob("*"):
            if f.is_symlink() and not f.exists():
                return f"{f} points at a missing blob"
    except OSError as exc:
        return f"cannot read {snap}: {exc.strerror}"
    return None


def local_dir_metadata(local_dir: Path, commit: str, files: Iterable[HubFile]) -> None:
    """``.cache/huggingface/download/<path>.metadata`` per file, written after the file is final."""
    hf = local_dir / ".cache" / "huggingface"
    try:
        hf.mkdir(parents=True, exist_ok=True)
        if not (hf / ".gitignore").exists():
            (hf / ".gitignore").write_text("*")
        now = time.time()
        for f in files:
            _atomic_write(hf / "download" / f"{f.path}.metadata", f"{commit}\n{f.etag}\n{now}\n")
    except OSError as exc:
        raise StorageError(f"cannot write download metadata in {hf}: {exc.strerror}") from exc
