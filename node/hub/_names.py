"""Covering manifests found by name: the signed name record ``hf:ORG/REPO`` that ``publish hf:// --name-publish`` writes.

A gateway asked for ``ORG/REPO`` looks the name up in the DHT among the
node's trusted publisher keys (as ``fetch hf:ORG/REPO`` does:
``SwarmNode.resolve_record``), fetches the signed manifest the newest record
points at from a peer (``SwarmNode.manifest_for``) and checks it: its
signature against the node's trust, its name ``hf:ORG/REPO``, its version
the record's commit. Such a manifest covers that commit only; the gateway's
flights of it come from the swarm (``_swarm_flights``), with the gateway's own
upstreams as web seeds, since a record carries no provenance file.

Strategy (the hub path must never wait long on the DHT): one lookup per
repository at a time, started as soon as a revision of it is resolved
(:meth:`NameCovers.look_ahead`), so it runs beside the Hub's API calls. Its
outcome (a manifest, or none: no record, a failure, a timeout after
``timeout`` seconds) is cached for ``ttl`` seconds. A flight waits for a
running lookup at most ``wait`` seconds, then goes to the hub; the lookup
goes on and its answer serves the next flights. Manifests once found keep
covering their commit (a newer record does not un-sign an older manifest).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from autoglm.node._manifests import check_manifest
from autoglm.node.errors import AutoglmError
from autoglm.protocol import SignedManifest, TrustPolicy
from autoglm.protocol._namerecord import NameRecord

__all__ = ["NameCovers", "NameSource", "name_of"]

log = logging.getLogger("autoglm.node.hub._gateway")

_MAX_ENTRIES = 1024


def name_of(repo: str) -> str:
    """The name record ``publish hf://`` points: ``hf:ORG/REPO``."""
    return f"hf:{repo}"


class NameSource(Protocol):
    """The node's name records (``SwarmNode``)."""

    def resolve_record(self, name: str, trust: TrustPolicy) -> Awaitable[NameRecord]: ...

    def manifest_for(self, rec: NameRecord) -> Awaitable[SignedManifest]: ...


@dataclass(slots=True)
class _Lookup:
    done: trio.Event = field(default_factory=trio.Event)
    at: float = 0.0  # when it ended
    commit: str | None = None  # the commit the newest trusted record names, once its manifest checked


class NameCovers:
    """``(repo, commit)`` -> the trusted signed manifest found through the name record, or None (see the module doc)."""

    def __init__(self, source: NameSource, trust: TrustPolicy, nursery: trio.Nursery, *,
                 ttl: float = 30.0, wait: float = 3.0, timeout: float = 30.0) -> None:
        self.source = source
        self.trust = trust
        self.nursery = nursery
        self.ttl = ttl
        self.wait = wait
        self.timeout = timeout
        self.lookups = 0  # started, for the logs and tests
        self._lookups: dict[str, _Lookup] = {}
        self._found: dict[tuple[str, str], SignedManifest] = {}

    def look_ahead(self, repo: str) -> _Lookup:
        """The repository's lookup: the cached one while fresh, else a new one started in the background."""
        lk = self._lookups.get(repo)
        if lk is not None and (not lk.done.is_set() or trio.current_time() - lk.at <= self.ttl):
            return lk
        if len(self._lookups) >= _MAX_ENTRIES:  # clients naming endless repositories must not grow this forever
            for k in [k for k, x in self._lookups.items() if x.done.is_set()]:
                del self._lookups[k]
        lk = self._lookups[repo] = _Lookup()
        self.lookups += 1
        self.nursery.start_soon(self._lookup, repo, lk)
        return lk

    async def covering(self, repo: str, commit: str) -> SignedManifest | None:
        """The manifest covering ``repo@commit``, waiting at most ``wait`` seconds for a running lookup."""
        if (repo, commit) in self._found:
            self.look_ahead(repo)  # keeps the record fresh for the next commit; nothing to wait for
            return self._found[(repo, commit)]
        lk = self.look_ahead(repo)
        with trio.move_on_after(self.wait):
            await lk.done.wait()
        if not lk.done.is_set():
            log.info("gateway: the name lookup of %s takes over %.1fs; %s@%s from the hub meanwhile",
                     name_of(repo), self.wait, repo, commit[:12])
        return self._found.get((repo, commit))

    async def _lookup(self, repo: str, lk: _Lookup) -> None:
        name = name_of(repo)
        t0 = trio.current_time()
        why = f"no answer within {self.timeout:.0f}s"
        try:
            with trio.move_on_after(self.timeout):
                why = await self._find(repo, name, lk)
        except Exception as exc:  # the one supervisor of a lookup: its failure only means "from the hub"
            why = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, AutoglmError):
                log.exception("gateway: the name lookup of %s failed", name)
        finally:
            lk.at = trio.current_time()
            lk.done.set()
        if lk.commit is None:
            log.info("gateway: %s: %s (%.2fs); no manifest found by name: the hub serves its commits", name, why, lk.at - t0)

    async def _find(self, repo: str, name: str, lk: _Lookup) -> str:
        rec = await self.source.resolve_record(name, self.trust)
        if (repo, rec.version) in self._found:
            lk.commit = rec.version
            return "known"
        signed = await self.source.manifest_for(rec)
        m = check_manifest(signed, self.trust)  # the record's key is trusted; the manifest's must be too
        if m.name != name or m.version != rec.version:
            return f"the record's manifest is {m.name}@{m.version[:12]}, not {name}@{rec.version[:12]}"
        if len(self._found) >= _MAX_ENTRIES:
            self._found.clear()
        self._found[(repo, m.version)] = signed
        lk.commit = m.version
        log.info("gateway: %s@%s is covered by manifest %s (signed name record by %s, seq %d)",
                 repo, m.version[:12], signed.id.hex()[:16], rec.publisher, rec.seq)
        return "found"
