"""One update: fetch a version into its own directory, check it, then switch ``current``.

The same path serves ``autoglm-node update`` (standalone or through a running
node), ``join --follow`` and the Python API. The fetch is an ordinary
:class:`FetchPlan` into ``ROOT/versions/<version>-<id>``: every piece whose
hash is already in the store (the previous version, any other model) is
copied locally, so only the changed pieces travel. Then the sandbox gate
checks every file (node/_gate.py), and only a version that passed becomes
``current`` (node/_versions.py). A refused version never becomes current.

:func:`rollback` switches ``current`` back and, for a version installed with
``update --hf-cache``, points the Hugging Face cache's ``refs/<revision>``
back at that version's commit, replaced last, as an update writes it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from autoglm.node._engine import FetchResult
from autoglm.node._plan import FetchPlan
from autoglm.node._progress import Event
from autoglm.node._versions import (
    HubPin,
    VersionSet,
    forget_in_store,
    register_root,
    version_dirname,
)
from autoglm.node.errors import StorageError, VerificationRefused
from autoglm.protocol import SignedManifest

if TYPE_CHECKING:
    from autoglm.node._store import Store

__all__ = ["Fetcher", "RollbackResult", "UpdateResult", "rollback", "update_to"]

log = logging.getLogger(__name__)

Fetcher = Callable[[FetchPlan, "trio.MemorySendChannel[Event] | None"], Awaitable[FetchResult]]


@dataclass(frozen=True, slots=True)
class UpdateResult:
    root: Path
    current: str  # the version directory now current
    previous: str | None
    switched: bool  # False: it already was current
    manifest_id: bytes
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    received_by_source: dict[str, int] = field(default_factory=dict)
    pruned: list[str] = field(default_factory=list)


def _gate(path: Path, data_dir: Path) -> None:
    """Every file through the sandbox; VerificationRefused names the first refused one. Blocking."""
    from autoglm.node._gate import VerdictCache, verify_tree

    cache = VerdictCache.in_data_dir(data_dir)
    try:
        results = verify_tree(path, cache=cache)
    finally:
        cache.close()
    refused = [(f, v) for f, v in results if not v.ok]
    if refused:
        f, v = refused[0]
        raise VerificationRefused(str(f.relative_to(path)), f"{v.reason or v.status} (the new version was not switched to)")


async def update_to(
    signed: SignedManifest,
    plan: FetchPlan,
    root: Path,
    keep: int,
    data_dir: Path,
    fetch: Fetcher,
    events: trio.MemorySendChannel[Event] | None = None,
    store: Store | None = None,
) -> UpdateResult:
    """Fetch ``signed`` (the plan's manifest) as a new version under ``root`` and switch to it.

    ``plan.out`` is replaced by the version's own directory. ``events`` is
    closed at the end, as a fetch closes it. With ``store``, the store
    forgets the copies of versions pruned here (so a later local copy never
    looks for a piece in a removed directory).
    """
    vs = VersionSet(root)
    m = signed.manifest
    dirname = version_dirname(m.version, signed.id)
    target = vs.path_for(dirname)
    with vs.locked():
        previous = await trio.to_thread.run_sync(vs.current)
        if previous == dirname:
            if events is not None:
                await events.aclose()
            return UpdateResult(root, dirname, previous, False, signed.id)
        await trio.to_thread.run_sync(lambda: target.mkdir(parents=True, exist_ok=True))
        await trio.to_thread.run_sync(register_root, data_dir, root)
        res = await fetch(dataclasses.replace(plan, manifest=signed, out=target), events)
        await trio.to_thread.run_sync(_gate, target, data_dir)
        before = {e.dirname for e in await trio.to_thread.run_sync(vs.entries)}
        await trio.to_thread.run_sync(vs.switch, dirname, keep, lambda dirs: forget_in_store(data_dir, dirs))
        after = {e.dirname for e in await trio.to_thread.run_sync(vs.entries)}
    pruned = sorted(before - after)
    if pruned and store is not None:
        await trio.to_thread.run_sync(lambda: store.gc())
    log.info("%s: now %s (was %s)%s", root, dirname, previous, f"; removed {', '.join(pruned)}" if pruned else "")
    return UpdateResult(root, dirname, previous, True, signed.id, dict(res.bytes_by_source),
                        dict(res.received_by_source), pruned)


@dataclass(frozen=True, slots=True)
class RollbackResult:
    root: Path
    previous: str | None  # the version rolled back from
    current: str
    pruned: list[str] = field(default_factory=list)  # versions that fell out of the kept set
    withdrawn: list[bytes] = field(default_factory=list)  # manifest ids the store forgot with them
    hub: HubPin | None = None  # refs/<revision> now names hub.commit
    hub_left: HubPin | None = None  # the cache ref rolled-from pinned, left alone: ``current`` has no pin


def rollback(root: Path, keep: int, data_dir: Path | None = None) -> RollbackResult:
    """Switch ``root`` back to the version used before; fetches nothing. Blocking.

    With a Hugging Face cache pin (``update --hf-cache``) on the version
    rolled back to, its snapshot must still be complete (StorageError before
    anything changes, e.g. after ``hf cache delete``); ``refs/<revision>`` is
    then replaced (temp file, rename) after ``current``. With ``data_dir``
    the store forgets the versions pruned here before they are removed.
    """
    from autoglm.node.hub._cache import repo_dir, snapshot_problem, write_ref

    vs = VersionSet(root)
    with vs.locked():
        was = vs.current()
        target = vs.previous()
        pin = vs.hub_pin(target)
        if pin is not None:
            problem = snapshot_problem(repo_dir(Path(pin.cache), pin.repo), pin.commit)
            if problem is not None:
                raise StorageError(f"cannot roll back to {target}: its Hugging Face cache snapshot {pin.commit[:12]} "
                                   f"is not complete ({problem}); nothing was changed. Run `update` with its "
                                   "manifest and --hf-cache to restore it")
        withdrawn: list[bytes] = []

        def forget(dirs: list[Path]) -> None:
            if data_dir is not None:
                withdrawn.extend(forget_in_store(data_dir, dirs))

        before = {e.dirname for e in vs.entries()}
        vs.rollback(keep, forget)
        pruned = sorted(before - {e.dirname for e in vs.entries()})
        if pin is not None:
            write_ref(repo_dir(Path(pin.cache), pin.repo), pin.revision, pin.commit)
        left = vs.hub_pin(was) if pin is None and was is not None else None
    return RollbackResult(root, was, target, pruned, withdrawn, pin, left)
