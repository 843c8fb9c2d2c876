"""The versions of one model on disk, and the atomic switch between them.

Layout of a version root (``DATA_DIR/models/<NAME>`` unless given)::

    ROOT/versions/<version>-<manifest id[:16]>/   one complete, verified copy per version
    ROOT/current -> versions/<...>                 relative symlink: the version in use
    ROOT/history.json                              directory names, newest switch first

Strategy: a version directory is filled and verified before anything points
at it, and ``current`` only ever changes by ``rename(2)`` of a fresh symlink
over it, so a reader sees the old target or the new one, never a mix and
never nothing. A reader resolves ``current`` once (:func:`resolve_current`)
and opens files under the resolved directory; that directory stays until it
falls out of the kept set, so a long load keeps a consistent view.

``current`` is the truth; ``history.json`` is advisory (it orders the kept
versions for ``rollback``) and is reconciled with ``current`` on every read,
so a crash between the two writes loses nothing. The switch is a list of
steps (:func:`plan_switch`) applied in order; a crash between any two of them
leaves a valid ``current`` (tests/update kills a process after each step).

Version roots are listed in ``DATA_DIR/version-roots`` so ``gc`` finds them
and removes only versions outside the kept set. Before a version directory is
removed (by a switch's prune step, a rollback's or ``gc``) the store forgets
the downloads into it (:func:`forget_in_store`): a crash in between leaves a
directory nobody points at (gc's to remove), never a store that still lists
removed pieces, so a node starting later does not announce them.

``ROOT/hf-cache.json`` records, per version installed with ``update
--hf-cache``, where its Hugging Face cache layout lives (cache, repo,
revision, commit), so ``rollback`` can point ``refs/<revision>`` back at the
rolled-back version's commit (node/_update.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autoglm.node.errors import ConfigError, StorageError

__all__ = [
    "CURRENT",
    "HubPin",
    "VersionSet",
    "apply_steps",
    "forget_in_store",
    "known_roots",
    "plan_switch",
    "register_root",
    "resolve_current",
    "version_dirname",
]

CURRENT = "current"
VERSIONS = "versions"
HISTORY = "history.json"
ROOTS_FILE = "version-roots"
HF_FILE = "hf-cache.json"
_LOCK = ".update.lock"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def version_dirname(version: str, manifest_id: bytes) -> str:
    """``<version>-<id[:16]>``: readable, unique per manifest, safe as one path component."""
    label = _UNSAFE.sub("_", version).strip("._")[:64] or "v"
    return f"{label}-{manifest_id.hex()[:16]}"


def default_root(data_dir: Path, name: str) -> Path:
    """Where NAME's versions live by default: ``DATA_DIR/models/<NAME, made one safe component>``."""
    safe = _UNSAFE.sub("_", name).strip("._")
    if not safe:
        raise ConfigError(f"cannot make a directory name from {name!r}; give --root")
    return data_dir / "models" / safe


def resolve_current(root: Path) -> Path | None:
    """The version directory ``ROOT/current`` points at now, or None before the first switch.

    Open every file of one load under the returned path: it is one version.
    """
    link = root / CURRENT
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"{link} is not a symlink ({exc.strerror}); it is not a version root") from exc
    return (root / target).resolve() if not os.path.isabs(target) else Path(target)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# -- the switch, as steps ---------------------------------------------------------

Step = tuple[str, Callable[[], None]]
#: Called with the version directories about to be removed, before they are (see forget_in_store).
Forget = Callable[[list[Path]], object]


def plan_switch(root: Path, dirname: str, history: list[str], keep: int, forget: Forget | None = None) -> list[Step]:
    """The steps that make ``versions/<dirname>`` current and keep ``keep`` earlier versions.

    Each step is (what, action). Order matters: the new ``current`` is a new
    symlink renamed over the old one (one rename(2): atomic); history follows;
    only then are the versions that fell out of the kept set removed, so a
    crash at any point leaves ``current`` valid and every kept version intact.
    ``forget`` hears of the directories the prune removes before it removes them.
    """
    tmp = root / f".{CURRENT}.{os.getpid()}.tmp"
    target = f"{VERSIONS}/{dirname}"
    new_history = [dirname, *(d for d in history if d != dirname)]
    kept = set(new_history[: keep + 1])

    def make_link() -> None:
        with suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target, tmp)

    def swap() -> None:
        os.replace(tmp, root / CURRENT)
        _fsync_dir(root)

    def record() -> None:
        _write_atomic(root / HISTORY, json.dumps(new_history[: keep + 1]).encode())

    def prune() -> None:
        # Only versions that fall out of the kept set here: a directory that
        # was never current (a fetch in progress or refused) is gc's to judge.
        gone = [root / VERSIONS / name for name in history if name not in kept and name != dirname]
        if gone and forget is not None:
            forget(gone)
        for d in gone:
            shutil.rmtree(d, ignore_errors=True)

    return [("link", make_link), ("swap", swap), ("record", record), ("prune", prune)]


def apply_steps(steps: list[Step]) -> None:
    for _what, action in steps:
        action()


def _version_dirs(root: Path) -> list[Path]:
    vdir = root / VERSIONS
    if not vdir.is_dir():
        return []
    return sorted(p for p in vdir.iterdir() if p.is_dir() and not p.is_symlink())


@dataclass(frozen=True, slots=True)
class HubPin:
    """A version's place in the Hugging Face cache: ``<cache>/models--ORG--REPO/refs/<revision>`` names ``commit``."""

    cache: str
    repo: str
    revision: str
    commit: str


def _read_json(path: Path) -> dict[str, Any]:
    try:
        v = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}


@dataclass(frozen=True, slots=True)
class VersionInfo:
    dirname: str
    path: Path
    current: bool


class VersionSet:
    """The versions under one root: list, switch, roll back, prune. Filesystem only, no network."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, dirname: str) -> Path:
        return self.root / VERSIONS / dirname

    def current(self) -> str | None:
        """The directory name ``current`` points at, or None."""
        target = resolve_current(self.root)
        return None if target is None else target.name

    def history(self) -> list[str]:
        """Kept versions, newest switch first, always starting with ``current`` (reconciled with disk)."""
        try:
            raw = json.loads((self.root / HISTORY).read_bytes())
            hist = [str(d) for d in raw] if isinstance(raw, list) else []
        except (OSError, ValueError):
            hist = []
        cur = self.current()
        on_disk = {p.name for p in _version_dirs(self.root)}
        hist = [d for d in hist if d in on_disk and d != cur]
        return [cur, *hist] if cur is not None else hist

    def entries(self) -> list[VersionInfo]:
        cur = self.current()
        hist = self.history()
        others = [p.name for p in _version_dirs(self.root) if p.name not in hist]
        return [VersionInfo(d, self.path_for(d), d == cur) for d in [*hist, *others]]

    def switch(self, dirname: str, keep: int, forget: Forget | None = None) -> None:
        """Make ``dirname`` (an existing, complete version directory) current; keep ``keep`` earlier ones.

        ``forget`` is called with the versions that fall out of the kept set, before they are removed.
        """
        if keep < 0:
            raise ConfigError("--keep is 0 or more")
        if not self.path_for(dirname).is_dir():
            raise StorageError(f"{self.path_for(dirname)} does not exist")
        try:
            apply_steps(plan_switch(self.root, dirname, self.history(), keep, forget))
        except OSError as exc:
            raise StorageError(f"cannot switch {self.root / CURRENT}: {exc.strerror}") from exc

    def previous(self) -> str:
        """The version used before ``current`` (what :meth:`rollback` switches to); ConfigError if none is kept."""
        hist = self.history()
        if len(hist) < 2:
            raise ConfigError(f"{self.root}: no earlier version is kept to roll back to")
        return hist[1]

    def rollback(self, keep: int, forget: Forget | None = None) -> str:
        """Switch back to the version used before ``current``; returns its directory name."""
        prev = self.previous()
        # The rolled-back-from version stays kept: history puts it second.
        self.switch(prev, max(keep, 1), forget)
        return prev

    def hub_pin(self, dirname: str) -> HubPin | None:
        """Where ``dirname``'s Hugging Face cache layout lives (``update --hf-cache``), or None."""
        v = _read_json(self.root / HF_FILE).get(dirname)
        fields = ("cache", "repo", "revision", "commit")
        if not isinstance(v, dict) or set(v) != set(fields) or not all(isinstance(v[f], str) for f in fields):
            return None
        return HubPin(v["cache"], v["repo"], v["revision"], v["commit"])

    def pin_hub(self, dirname: str, pin: HubPin) -> None:
        """Record ``pin`` for ``dirname``; records of versions no longer on disk are dropped."""
        on_disk = {p.name for p in _version_dirs(self.root)}
        pins = {d: v for d, v in _read_json(self.root / HF_FILE).items() if d in on_disk and d != dirname}
        pins[dirname] = asdict(pin)
        _write_atomic(self.root / HF_FILE, json.dumps(pins, indent=1, sort_keys=True).encode())

    def kept(self, keep: int | None = None) -> set[str]:
        """Directory names that must stay: ``current`` and the versions in history."""
        hist = self.history()
        return set(hist if keep is None else hist[: keep + 1])

    def stale(self) -> list[Path]:
        """Version directories outside the kept set (a failed update, a prune cut short)."""
        kept = self.kept()
        return [p for p in _version_dirs(self.root) if p.name not in kept]

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One update or rollback per root at a time (an flock, released when the process dies)."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise ConfigError(f"another update or rollback is running on {self.root}") from exc
            yield
        finally:
            os.close(fd)

    def busy(self) -> bool:
        from autoglm.node._staging import is_locked

        return is_locked(self.root / _LOCK)


# -- the roots gc knows about -----------------------------------------------------


def register_root(data_dir: Path, root: Path) -> None:
    """Remember ``root`` in ``DATA_DIR/version-roots`` (so ``gc`` honours its kept versions)."""
    roots = known_roots(data_dir)
    root = root.resolve()
    if root in roots:
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(data_dir / ROOTS_FILE, "".join(f"{r}\n" for r in [*roots, root]).encode())


def known_roots(data_dir: Path) -> list[Path]:
    try:
        text = (data_dir / ROOTS_FILE).read_text()
    except FileNotFoundError:
        return []
    return [Path(line) for line in text.splitlines() if line.strip()]


def forget_in_store(data_dir: Path, dirs: Iterable[Path]) -> list[bytes]:
    """The store forgets every download into ``dirs`` (or below); returns their manifest ids. Blocking.

    Called before the directories are removed, so the store never lists
    pieces that are gone (a node reads the store at start to say what it
    holds). A running node still announces them until told (``withdraw``).
    """
    from autoglm.node._storedb import StoreDB

    targets = [d.resolve() for d in dirs]
    if not targets or not (data_dir / "store.sqlite").exists():
        return []
    db = StoreDB(data_dir)
    try:
        mids: list[bytes] = []
        for did, mid, out_dir in db.query("SELECT id, manifest_id, out_dir FROM downloads"):
            od = Path(str(out_dir))
            if any(od == t or od.is_relative_to(t) for t in targets):
                db.forget(int(did))
                mids.append(bytes(mid))
        return mids
    finally:
        db.close()


def collect_versions(data_dir: Path) -> tuple[list[str], list[bytes]]:
    """Remove version directories outside each root's kept set; never ``current`` or history.

    Returns what was done (one line each) and the manifest ids of the
    downloads the store forgot with them (a running node must withdraw them).
    """
    done: list[str] = []
    forgotten: list[bytes] = []
    for root in known_roots(data_dir):
        vs = VersionSet(root)
        if not root.is_dir():
            continue
        if vs.busy():
            done.append(f"skipped versions of {root}: an update is running")
            continue
        for p in vs.stale():
            forgotten += forget_in_store(data_dir, [p])
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed version {p} (not current, not kept)")
        for tmp in root.glob(f".{CURRENT}.*.tmp"):
            tmp.unlink(missing_ok=True)
    return done, forgotten


def gc_versions(data_dir: Path) -> list[str]:
    """:func:`collect_versions`, what was done only."""
    return collect_versions(data_dir)[0]
