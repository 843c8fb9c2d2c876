"""The swarm service: peer sessions, serving, choking, bans, and peers as fetch sources.

The parts (docs/architecture.md): :mod:`.swarm` (the façade), :mod:`.session`
(one peer session and its sources), :mod:`.dialer` (dialling, the tie-break,
backoff, warm sessions, reconnects, peer exchange), :mod:`.fetches` (attached
fetches, bans, first-copy membership, claims), :mod:`.held` (what we hold and
serve), :mod:`.discovery` (DHT lookups, provider pacing) and :mod:`.aliases`
(identical files under other manifests); :mod:`.config` holds the settings,
events and interfaces. The policies (choking, membership) are pure functions
in ``autoglm.protocol``.
"""

from __future__ import annotations

from autoglm.protocol._choking import choose_unchoked

from .config import (
    Announced,
    FetchHandle,
    PeerBanned,
    PeerBudget,
    PieceStore,
    SwarmConfig,
    SwarmEvent,
    SwarmStats,
)
from .session import PeerSource, Session
from .swarm import Swarm

__all__ = [
    "Announced",
    "FetchHandle",
    "PeerBanned",
    "PeerBudget",
    "PeerSource",
    "PieceStore",
    "Session",
    "Swarm",
    "SwarmConfig",
    "SwarmEvent",
    "SwarmStats",
    "choose_unchoked",
]
