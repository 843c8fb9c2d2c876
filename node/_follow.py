"""Following a name: ``join --follow NAME`` keeps ``ROOT/current`` on NAME's newest version.

Theory of operation. A follower task in the joined node learns a new
sequence number two ways:

* polling: it resolves NAME's signed record in the DHT (every trusted
  publisher key, highest valid ``seq``). The wait between polls starts at
  ``interval_min``, doubles while nothing changes and is capped at
  ``interval_max``; a change resets it (:class:`PollSchedule`, pure, time is
  a parameter);
* push: every node that learns a higher ``seq`` for a followed name PUTs the
  record straight to its session peers (a DHT PUT_VALUE, validated by the
  receiver like any put); a follower that receives one wakes and resolves
  at once (at most one wake per ``_WAKE_GAP``: a peer cannot make it spin).

So a follower connected to one that knows the new record picks it up within
a lookup, and any follower within ``interval_max`` plus a lookup
(docs/operations.md states the bound). Then the same path as
``autoglm-node update`` runs (node/_update.py): fetch the delta (peers first),
the sandbox gate, the atomic switch. A staged record (``rollout`` below
100 %) is taken only if :func:`rollout_admits` says this peer is in. A
follower offline for several versions resolves the newest record and jumps
straight to it. The last sequence number handled is kept in
``ROOT/follow.json``, so a restart does not undo a local ``rollback``.
With ``--hf-cache`` each version also goes into the Hugging Face cache
layout, ``refs/<revision>`` moved after ``current`` (node/_hfversions.py:
the Hub identity of a manifest that came by name).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from autoglm.node._plan import FetchPlan
from autoglm.node._update import HfCache, UpdateResult, update_to
from autoglm.node._versions import default_root
from autoglm.node.errors import AutoglmError, ConfigError
from autoglm.protocol import SignedManifest, TrustPolicy
from autoglm.protocol._namerecord import ROLLOUT_FULL, NameRecord, rollout_admits

if TYPE_CHECKING:
    from autoglm.node._progress import Event
    from autoglm.node._swarm_node import SwarmNode

__all__ = ["FollowConfig", "PollSchedule", "follow", "node_update"]

log = logging.getLogger(__name__)

_FLEET_POLL = 0.05  # seconds between looks at the sessions while an update waits for the fleet
_WAKE_GAP = 0.5  # seconds: the earliest poll after the previous one that a push can cause
_STATE = "follow.json"


@dataclass(frozen=True, slots=True)
class FollowConfig:
    name: str
    root: Path | None = None  # default DATA_DIR/models/<NAME>
    keep: int = 2
    interval_min: float = 5.0
    interval_max: float = 60.0
    hf_cache: HfCache | None = None  # --hf-cache: each version also into the Hugging Face cache layout


class PollSchedule:
    """When to resolve the record next: exponential backoff while nothing changes, reset on change.

    Pure: every method takes ``now``. ``deadline`` never lies more than
    ``hi`` after the previous poll, which is what bounds the pick-up time.
    """

    def __init__(self, lo: float, hi: float) -> None:
        if not 0 < lo <= hi:
            raise ConfigError("follow intervals need 0 < min <= max")
        self.lo, self.hi = lo, hi
        self.wait = lo
        self.last = -math.inf
        self.deadline = -math.inf  # poll at once on start

    def polled(self, now: float, changed: bool) -> None:
        self.wait = self.lo if changed else min(self.wait * 2, self.hi)
        self.last = now
        self.deadline = now + self.wait

    def pushed(self, now: float) -> None:
        """A peer pushed a newer record: poll as soon as the wake gap allows."""
        self.deadline = min(self.deadline, max(now, self.last + _WAKE_GAP))


def _load_seen(root: Path) -> int:
    try:
        v = json.loads((root / _STATE).read_bytes())
        return int(v["seq"]) if isinstance(v, dict) else -1
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _save_seen(root: Path, seq: int) -> None:
    from autoglm.node._versions import _write_atomic

    root.mkdir(parents=True, exist_ok=True)
    _write_atomic(root / _STATE, json.dumps({"seq": seq}).encode())


async def node_update(
    sn: SwarmNode,
    signed: SignedManifest,
    root: Path | None,
    keep: int,
    plan: FetchPlan | None = None,
    events: trio.MemorySendChannel[Event] | None = None,
    rollout: int = ROLLOUT_FULL,
    hf: HfCache | None = None,
) -> UpdateResult:
    """The update path inside a joined node: peers first, then mirrors; gate; switch.

    ``rollout``: the share (ppm) of followers the name record admits; the
    update waits only for those (protocol/_rollout.py). ``hf``: also the
    Hugging Face cache layout (node/_hfversions.py).
    """
    data_dir = sn.config.data_dir
    root = root or default_root(data_dir, signed.manifest.name)
    trust = sn.trust or TrustPolicy()
    plan = plan or FetchPlan(signed, root, trust)

    from autoglm.node._versions import VersionSet

    cur = await trio.to_thread.run_sync(VersionSet(root).current)
    old = None if cur is None else _held_id(sn, cur)  # the version being replaced, as this node holds it

    async def before_start(mid: bytes) -> None:
        if old is not None and old != mid:
            await _await_fleet(sn, old, mid, rollout)

    async def fetch(p: FetchPlan, ev: trio.MemorySendChannel[Event] | None) -> Any:
        return await sn.hold(p, events=ev, before_start=before_start)

    res = await update_to(signed, plan, root, keep, data_dir, fetch, events, sn.node.store, hf)
    if res.pruned:
        await _unannounce(sn, res.pruned, root)
    return res


def _held_id(sn: SwarmNode, dirname: str) -> bytes | None:
    """The held manifest a version directory ``<version>-<id[:16]>`` is named after."""
    prefix = dirname.rsplit("-", 1)[-1]
    found = [m for m in sn.swarm.held.ids() if m.hex()[:16] == prefix]
    return found[0] if len(found) == 1 else None


async def _await_fleet(sn: SwarmNode, old: bytes, new: bytes, rollout: int) -> None:
    """Before an update's first request: the rest of the fleet (session peers holding ``old``) is in the new
    manifest's swarm, so every follower shares the changed pieces' first copies over the same members
    (protocol/_rollout.py; bounded by ROLLOUT_BOUND)."""
    from autoglm.node.swarm.fetches import is_idle
    from autoglm.protocol._rollout import fleet_for, rollout_waiting

    t0 = trio.current_time()
    announced: dict[str, float] = {}
    while True:
        now = trio.current_time()
        holders: list[str] = []
        members: set[str] = set()
        for p, s in list(sn.swarm.sessions.items()):
            bf = s.bitfield(old)
            if s.closed:
                continue
            if bf is not None and len(bf) > 0:
                holders.append(p)
            if s.bitfield(new) is not None:
                announced.setdefault(p, now)
                if not is_idle(s, new) and not sn.swarm.is_banned(p, new):
                    members.add(p)
        fleet = fleet_for(holders, new, rollout)
        w = rollout_waiting(fleet, announced, members, now, started=t0)
        if w.recheck is None:
            log.info("%s: %d of %d fleet peer(s) in the swarm after %.2f s%s", new.hex()[:16],
                     sum(1 for p in fleet if p in members), len(fleet), now - t0,
                     "" if not (set(fleet) - members - set(announced)) else
                     f"; {len(set(fleet) - members - set(announced))} never announced it (down, or not following)")
            return
        await trio.sleep_until(min(w.recheck, now + _FLEET_POLL))


async def _unannounce(sn: SwarmNode, pruned: list[str], root: Path) -> None:
    """Versions pruned from ``root``: peers and the DHT stop hearing of their pieces (what the store still
    holds of them elsewhere, another output directory, stays announced)."""
    for dirname in pruned:
        mid = _held_id(sn, dirname)
        if mid is None:
            continue
        await sn.swarm.withdraw(mid)
        if mid not in sn.swarm.held:
            log.info("%s: version %s removed; its manifest is no longer announced", root, dirname)


async def _apply(sn: SwarmNode, cfg: FollowConfig, root: Path, rec: NameRecord) -> None:
    """A newer record: tell the session peers, then update if it admits this peer. Raises on failure."""
    await sn.p2p.push_name_record(rec, sn.p2p.connected_peers())
    if not rollout_admits(sn.p2p.peer_id, rec.manifest_id, rec.rollout):
        log.info("follow %s: seq %d (%s) is staged to %.1f %% of followers; this node is not among them yet",
                 cfg.name, rec.seq, rec.version, rec.rollout / 10_000)
    else:
        signed = await sn.manifest_for(rec)
        res = await node_update(sn, signed, root, cfg.keep, rollout=rec.rollout, hf=cfg.hf_cache)
        log.info("follow %s: seq %d -> %s%s", cfg.name, rec.seq, res.current, "" if res.switched else " (already current)")
    await trio.to_thread.run_sync(_save_seen, root, rec.seq)


async def follow(sn: SwarmNode, cfg: FollowConfig, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Follow ``cfg.name`` until cancelled (a task of the joined node)."""
    trust = sn.trust
    if trust is None or not trust.keys:
        raise ConfigError(f"--follow {cfg.name} needs a trusted publisher key (--trust KEY.pub or the trust store)")
    root = cfg.root or default_root(sn.config.data_dir, cfg.name)
    seen = await trio.to_thread.run_sync(_load_seen, root)
    tried = seen  # the highest seq an update was attempted for: pushes of it (or lower) never wake us again
    sched = PollSchedule(cfg.interval_min, cfg.interval_max)
    wake = trio.Event()

    def on_record(rec: NameRecord) -> None:
        current = sn.trust or trust
        if rec.name == cfg.name and rec.seq > tried and rec.public_key in current.keys:
            sched.pushed(trio.current_time())
            wake.set()

    sn.follow_hooks.append(on_record)
    task_status.started()
    try:
        while True:
            now = trio.current_time()
            if now < sched.deadline:
                with trio.move_on_at(sched.deadline):
                    await wake.wait()
                wake = trio.Event()
                if trio.current_time() < sched.deadline:
                    continue  # woken by a push: the deadline moved; go round once more
            changed = False
            try:
                rec = await sn.resolve_record(cfg.name, sn.trust or trust)
                if rec.seq > seen:
                    tried = max(tried, rec.seq)
                    changed = True
                    await _apply(sn, cfg, root, rec)
                    seen = rec.seq
                elif sched.last == -math.inf:  # the first poll since start: say why nothing moves
                    log.info("follow %s: seq %d already handled (follow.json); the current version stays until "
                             "a higher seq", cfg.name, rec.seq)
            except AutoglmError as exc:
                # Retried at the next poll (with backoff); the current version stays in use.
                log.warning("follow %s: %s", cfg.name, exc)
            except Exception:  # the follower's supervisor: a bug here never stops the node
                log.exception("follow %s failed; retrying at the next poll", cfg.name)
            sched.polled(trio.current_time(), changed and seen == tried)
    finally:
        sn.follow_hooks.remove(on_record)


async def control_update(stream: Any, sn: SwarmNode, req: dict[str, Any]) -> None:
    """The control API's ``update`` op: resolve (name) or load (manifest), then :func:`node_update`.

    An explicit update takes the newest record whatever its roll-out share:
    the operator asked for it. Progress events stream as for ``fetch``.
    """
    from autoglm.node._control_api import _forward, _send
    from autoglm.node._keys import load_trust_policy
    from autoglm.node._progress import Event
    from autoglm.node.api import load_manifest

    send, recv = trio.open_memory_channel[Event](64)
    try:
        trust = load_trust_policy(
            sn.config.data_dir, [Path(p) for p in req.get("trust", [])], [Path(p) for p in req.get("roots", [])],
            [str(x) for x in req.get("spiffe_ids", [])],
        )
        if not trust.keys and not trust.roots and sn.trust is not None:
            trust = sn.trust
        keep = req.get("keep", 2)
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
            raise ConfigError("update: keep is a whole number >= 0")
        root = Path(str(req["root"])) if req.get("root") else None
        hf = HfCache.from_wire(req["hf_cache"]) if req.get("hf_cache") is not None else None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_forward, stream, recv)
            rec: NameRecord | None = None
            if "name" in req:
                rec = await sn.resolve_record(str(req["name"]), trust)
                signed = await sn.manifest_for(rec)
            else:
                signed, _ = await load_manifest(str(req["manifest"]), trust, req.get("headers") or {})
                if hf is not None:
                    hf = await trio.to_thread.run_sync(_with_provenance, hf, str(req["manifest"]), signed)
            root = root or default_root(sn.config.data_dir, signed.manifest.name)
            plan = FetchPlan.from_wire({**req, "out": str(root), "manifest": "-"}, trust, signed)
            try:
                res = await node_update(sn, signed, root, keep, plan, send,
                                        rec.rollout if rec is not None else ROLLOUT_FULL, hf)
            except BaseException:
                await send.aclose()
                raise
            if rec is not None:
                await trio.to_thread.run_sync(_save_seen, root, rec.seq)
        await _send(stream, {"event": "updated", **_result_value(res)})
    except* (AutoglmError, KeyError) as eg:
        exc = eg.exceptions[0]
        await _send(stream, {"event": "error", "message": str(exc), "kind": type(exc).__name__})


def _with_provenance(hf: HfCache, manifest: str, signed: SignedManifest) -> HfCache:
    """A MANIFEST file with its ``.hub.json`` beside it: the checked provenance names the Hub identity. Blocking."""
    from autoglm.node.hub._publish import load_provenance, sidecar_path

    if manifest.startswith(("http://", "https://")) or not sidecar_path(Path(manifest)).is_file():
        return hf
    return HfCache(hf.cache, hf.revision, load_provenance(sidecar_path(Path(manifest)), signed))


def _result_value(res: UpdateResult) -> dict[str, Any]:
    out = {
        "root": str(res.root), "current": res.current, "previous": res.previous, "switched": res.switched,
        "manifest_id": res.manifest_id.hex(), "bytes_by_source": res.bytes_by_source,
        "received_by_source": res.received_by_source, "pruned": res.pruned,
    }
    if res.hf_snapshot is not None:
        out["hf_snapshot"] = res.hf_snapshot
    return out


async def preheat(sn: SwarmNode, signed: SignedManifest, spec: Any) -> None:
    """``name-publish --preheat DIR``: this node fetches the version (peers, then ``mirrors``) before the
    name moves, so followers find every changed piece at a peer and the origin serves one copy.

    The manifest is trusted for this fetch because it is signed by the key the
    record is about to be signed with (checked again by ``publish_name``).
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("out"), str):
        raise ConfigError("name_publish: preheat needs {'out': DIR, 'mirrors': [...]}")
    mirrors = spec.get("mirrors") or []
    if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
        raise ConfigError("name_publish: preheat mirrors must be a list of URLs")
    plan = FetchPlan(signed, Path(spec["out"]), TrustPolicy(keys=frozenset({signed.public_key})), mirrors=tuple(mirrors))
    res = await sn.hold(plan)
    log.info("preheated %s %s: %s", signed.manifest.name, signed.manifest.version, res.bytes_by_source)
