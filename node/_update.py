"""One update: fetch a version into its own directory, check it, then switch ``current``.

The same path serves ``autoglm-node update`` (standalone or through a running
node), ``join --follow`` and the Python API. The fetch is an ordinary
:class:`FetchPlan` into ``ROOT/versions/<version>-<id>``: every piece whose
hash is already in the store (the previous version, any other model) is
copied locally, so only the changed pieces travel. Then the sandbox gate
checks every file (node/_gate.py), and only a version that passed becomes
``current`` (node/_versions.py). A refused version never becomes current.

:func:`rollback` switches ``current`` back and, for a version installed with
``update --hf-cache`` or ``join --follow --hf-cache``, points the Hugging
Face cache's ``refs/<revision>`` back at that version's commit, replaced
last, as an update writes it.
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
from autoglm.node._hfversions import (
    HfCache,
    HubTarget,
    hub_files,
    hub_target,
    plan_hf_install,
    plan_hf_switch,
)
from autoglm.node._plan import FetchPlan
from autoglm.node._progress import Event
from autoglm.node._versions import (
    HubPin,
    VersionSet,
    apply_steps,
    forget_in_store,
    register_root,
    version_dirname,
)
from autoglm.node.errors import ConfigError, StorageError, VerificationRefused
from autoglm.protocol import SignedManifest

if TYPE_CHECKING:
    from autoglm.node._store import Store

__all__ = ["Fetcher", "HfCache", "RollbackResult", "UpdateResult", "rollback", "update_to"]

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
    hf_snapshot: str | None = None  # with --hf-cache: snapshots/<commit> that refs/<revision> names now


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
    hf: HfCache | None = None,
) -> UpdateResult:
    """Fetch ``signed`` (the plan's manifest) as a new version under ``root`` and switch to it.

    ``plan.out`` is replaced by the version's own directory. ``events`` is
    closed at the end, as a fetch closes it. With ``store``, the store
    forgets the copies of versions pruned here (so a later local copy never
    looks for a piece in a removed directory). With ``hf`` the version also
    goes into the Hugging Face cache layout (node/_hfversions.py): blobs and
    snapshot before ``current`` moves, ``refs/<revision>`` after it; a
    version already current is (re)installed there.
    """
    vs = VersionSet(root)
    m = signed.manifest
    dirname = version_dirname(m.version, signed.id)
    target = vs.path_for(dirname)
    hub = hub_target(signed, hf, vs) if hf is not None else None  # a ConfigError here fetches nothing
    with vs.locked():
        previous = await trio.to_thread.run_sync(vs.current)
        if previous == dirname:
            if events is not None:
                await events.aclose()
            if hf is None or hub is None:
                return UpdateResult(root, dirname, previous, False, signed.id)
            await trio.to_thread.run_sync(_install_current, vs, dirname, signed, hf, hub)
            return UpdateResult(root, dirname, previous, False, signed.id, hf_snapshot=_snapshot(hub))
        await trio.to_thread.run_sync(lambda: target.mkdir(parents=True, exist_ok=True))
        await trio.to_thread.run_sync(register_root, data_dir, root)
        res = await fetch(dataclasses.replace(plan, manifest=signed, out=target), events)
        await trio.to_thread.run_sync(_gate, target, data_dir)
        before = {e.dirname for e in await trio.to_thread.run_sync(vs.entries)}

        def forget(dirs: list[Path]) -> None:
            forget_in_store(data_dir, dirs)

        if hf is None or hub is None:
            await trio.to_thread.run_sync(vs.switch, dirname, keep, forget)
        else:
            await trio.to_thread.run_sync(_switch_with_hub, vs, dirname, keep, signed, hf, hub, forget)
        after = {e.dirname for e in await trio.to_thread.run_sync(vs.entries)}
    pruned = sorted(before - after)
    if pruned and store is not None:
        await trio.to_thread.run_sync(lambda: store.gc())
    log.info("%s: now %s (was %s)%s%s", root, dirname, previous, f"; removed {', '.join(pruned)}" if pruned else "",
             "" if hub is None else f"; {hub.repo_dir}/refs/{hub.revision} -> {hub.commit}")
    return UpdateResult(root, dirname, previous, True, signed.id, dict(res.bytes_by_source),
                        dict(res.received_by_source), pruned, None if hub is None else _snapshot(hub))


def _snapshot(hub: HubTarget) -> str:
    return str(hub.repo_dir / "snapshots" / hub.commit)


def _switch_with_hub(vs: VersionSet, dirname: str, keep: int, signed: SignedManifest, hf: HfCache, hub: HubTarget,
                     forget: Callable[[list[Path]], None]) -> None:
    """Blocking: the version's Hub identity, then pin, cache blobs and snapshot, ``current``, ``refs/`` (in order)."""
    if keep < 0:
        raise ConfigError("--keep is 0 or more")
    files = hub_files(signed, hf, vs.path_for(dirname))
    try:
        apply_steps(plan_hf_switch(vs, dirname, keep, hub, files, forget))
    except OSError as exc:
        raise StorageError(f"cannot switch {vs.root}/current: {exc.strerror}") from exc


def _install_current(vs: VersionSet, dirname: str, signed: SignedManifest, hf: HfCache, hub: HubTarget) -> None:
    """Blocking: the version already current goes into the cache (pin, blobs, tree, snapshot, ref)."""
    files = hub_files(signed, hf, vs.path_for(dirname))
    before, ref = plan_hf_install(hub, files, vs.path_for(dirname))
    vs.pin_hub(dirname, hub.pin)
    apply_steps([*before, ref])


@dataclass(frozen=True, slots=True)
class RollbackResult:
    root: Path
    previous: str | None  # the version rolled back from
    current: str
    pruned: list[str] = field(default_factory=list)  # versions that fell out of the kept set
    withdrawn: list[bytes] = field(default_factory=list)  # manifest ids the store forgot with them
    hub: HubPin | None = None  # refs/<revision> now names hub.commit
    hub_left: HubPin | None = None  # the cache ref rolled-from pinned, left alone: ``current`` has no pin


def rollback(root: Path, keep: int, data_dir: Path | None = None,
             withdrawn_hook: Callable[[list[bytes]], object] | None = None) -> RollbackResult:
    """Switch ``root`` back to the version used before; fetches nothing. Blocking.

    With a Hugging Face cache pin (``update --hf-cache``) on the version
    rolled back to, its snapshot must still be complete (StorageError before
    anything changes, e.g. after ``hf cache delete``); ``refs/<revision>`` is
    then replaced (temp file, rename) after ``current``. With ``data_dir``
    the store forgets the versions pruned here before they are removed;
    ``withdrawn_hook`` hears their manifest ids as soon as they are gone (a
    running node must stop announcing them even if the ref write then fails).
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
        if withdrawn and withdrawn_hook is not None:
            withdrawn_hook(list(withdrawn))
        pruned = sorted(before - {e.dirname for e in vs.entries()})
        if pin is not None:
            write_ref(repo_dir(Path(pin.cache), pin.repo), pin.revision, pin.commit)
        left = vs.hub_pin(was) if pin is None and was is not None else None
    return RollbackResult(root, was, target, pruned, withdrawn, pin, left)
