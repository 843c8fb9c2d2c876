"""What this node holds and serves: manifests with their verified pieces, envelopes, tokens and grants.

Hello and Announce tell peers what is held; the peerwire server asks
:meth:`Serving.redeem` for the grant a token stands for and
:meth:`Serving.locate` where a piece lies. Only verified pieces of held
manifests are ever located, and a choked or banned peer is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import trio

from autoglm.node._peerwire import new_token
from autoglm.node._store import PieceLocation
from autoglm.node.errors import AutoglmError, StorageError
from autoglm.protocol import Manifest
from autoglm.protocol._bitfield import Bitfield
from autoglm.protocol._control import (
    MAX_ENVELOPE,
    MAX_MANIFESTS,
    Announce,
    ControlMessage,
    ManifestState,
)
from autoglm.protocol._peerwire import RejectReason

from .config import PeerBudget, PieceStore, SwarmStats
from .session import Session

__all__ = ["Grant", "Held", "Serving", "tell", "withdraw"]

log = logging.getLogger("autoglm.node.swarm")

_HELLO_BUDGET = 3 * 1024 * 1024  # bytes of bitfields in one Hello (frames stop at 4 MiB)


@dataclass(slots=True)
class _Manifest:
    piece_count: int
    have: Bitfield


class Held:
    """The manifests this node holds (fully or partly): what Hello and Announce say."""

    def __init__(self, store: PieceStore) -> None:
        self._store = store
        self._held: dict[bytes, _Manifest] = {}
        self.envelopes: dict[bytes, bytes] = {}  # signed manifests peers may ask for by id
        self.changed = trio.Event()  # set when a manifest starts being held or is re-read

    def _changed(self) -> None:
        self.changed.set()

    def reset_changed(self) -> None:
        self.changed = trio.Event()

    def ids(self) -> list[bytes]:
        return list(self._held)

    def __contains__(self, manifest_id: object) -> bool:
        return manifest_id in self._held

    def has(self, manifest_id: bytes, index: int) -> bool:
        h = self._held.get(manifest_id)
        return h is not None and index in h.have

    def have(self, manifest_id: bytes) -> Bitfield | None:
        h = self._held.get(manifest_id)
        return None if h is None else h.have

    def start_holding(self, manifest_id: bytes, piece_count: int, have: Iterable[int] = (), envelope: bytes | None = None) -> bool:
        """Start holding a manifest; True when it is new here (then peers must hear of it)."""
        if envelope is not None and len(envelope) <= MAX_ENVELOPE:
            self.envelopes[manifest_id] = envelope
        if manifest_id in self._held:
            return False
        self._held[manifest_id] = _Manifest(piece_count, Bitfield(piece_count, have))
        self._changed()
        return True

    async def withdraw(self, manifest_id: bytes) -> ManifestState | None:
        """Re-read ``manifest_id`` after pieces were removed; stop holding it when none is left.

        Returns the state peers must hear (an empty bitfield once it is no
        longer held), or None when it was not held.
        """
        h = self._held.get(manifest_id)
        if h is None:
            return None
        before = h.have.copy()
        try:
            bits = await trio.to_thread.run_sync(self._store.bitfield, manifest_id)
            have = Bitfield.from_bytes(bits, h.piece_count)
        except (AutoglmError, ValueError):  # the store no longer knows it: nothing is left
            have = Bitfield(h.piece_count)
        # While the store was read, a fetch of the same manifest may have verified pieces
        # (add_piece: peers already heard Have) or a new hold may have replaced the entry:
        # what arrived meanwhile stays held, and only the entry that was read is dropped.
        now = self._held.get(manifest_id)
        if now is not None:
            for i in now.have:
                if i not in before:
                    have.add(i)
        if len(have) == 0:
            if now is h:
                del self._held[manifest_id]
                self.envelopes.pop(manifest_id, None)
        elif now is h or now is None:
            self._held[manifest_id] = _Manifest(h.piece_count, have)
        else:
            now.have = have
        self._changed()
        return ManifestState(manifest_id, h.piece_count, have.to_bytes())

    def add_piece(self, manifest_id: bytes, index: int) -> bool:
        """A piece is verified here; True when it is news."""
        h = self._held.get(manifest_id)
        return h is not None and h.have.add(index)

    def state(self, mid: bytes) -> ManifestState:
        h = self._held[mid]
        return ManifestState(mid, h.piece_count, h.have.to_bytes())

    def hello_states(self) -> tuple[list[ManifestState], list[ManifestState]]:
        """(what fits one Hello frame, what follows as Announce)."""
        states = [self.state(m) for m in self._held]
        first, size = 0, 0
        while first < min(len(states), MAX_MANIFESTS) and size + len(states[first].bitfield) < _HELLO_BUDGET:
            size += len(states[first].bitfield) + 64
            first += 1
        return states[:first], states[first:]

    async def load(self) -> None:
        for mid in await trio.to_thread.run_sync(self._store.manifest_ids):
            await self.refresh(mid)

    async def refresh(self, mid: bytes) -> None:
        """Re-read a manifest's verified pieces from the store."""
        try:
            bits = await trio.to_thread.run_sync(self._store.bitfield, mid)
        except AutoglmError as exc:
            log.warning("cannot read the bitfield of %s: %s", mid.hex()[:16], exc)
            return
        m = self.manifest(mid)
        n = m.piece_count if m is not None else len(bits) * 8
        self._held[mid] = _Manifest(n, Bitfield.from_bytes(bits, n))
        self._changed()

    def manifest(self, mid: bytes) -> Manifest | None:
        try:
            return self._store.manifest(mid)
        except (AutoglmError, KeyError):
            return None

    def file_hashes(self, mid: bytes) -> Sequence[bytes]:
        m = self.manifest(mid)
        return [f.sha256 for f in m.files] if m is not None else []

    def complete_file_hashes(self, mid: bytes) -> list[bytes]:
        """SHA-256 of each file of ``mid`` whose every piece is held."""
        h = self._held.get(mid)
        m = self.manifest(mid) if h is not None else None
        if h is None or m is None:
            return []
        out, start = [], 0
        for f in m.files:
            n = len(f.pieces)
            if all(i in h.have for i in range(start, start + n)):
                out.append(f.sha256)
            start += n
        return out

    def status(self) -> dict[str, dict[str, int]]:
        return {m.hex(): {"have": len(h.have), "pieces": h.piece_count} for m, h in self._held.items()}


class Grant:
    """What a redeemed peerwire token stands for: one peer, asking under the swarm's rules."""

    def __init__(self, serving: Serving, peer_id: str) -> None:
        self._serving = serving
        self.peer_id = peer_id
        self._open = True

    def check(self, manifest_id: bytes, index: int) -> RejectReason | None:
        return self._serving.check(self.peer_id, manifest_id, index)

    def served(self, manifest_id: bytes, index: int, nbytes: int) -> None:
        self._serving.count_served(self.peer_id, nbytes)

    def release(self) -> None:
        """The connection this grant opened has ended."""
        if self._open:
            self._open = False
            self._serving.conn_closed(self.peer_id)


def tell(sessions: Iterable[Session], mid: bytes, msg: ControlMessage) -> None:
    """``msg`` to every peer of ``sessions`` we announced ``mid`` to."""
    for s in list(sessions):
        if mid in s.announced:
            s.post(msg)


async def withdraw(held: Held, sessions: Mapping[str, Session], mid: bytes, gone: Callable[[bytes], None]) -> None:
    """Pieces of ``mid`` were removed here (a version pruned by ``update --keep``): tell peers what is left.

    Peers hear the new bitfield as an Announce; when nothing is left the
    manifest is no longer held (not in a Hello) and ``gone(mid)`` runs first
    (the swarm stops renewing its provider record in the DHT and drops it
    from this node's own provider store).
    """
    state = await held.withdraw(mid)
    if state is None:
        return
    if mid not in held:
        gone(mid)
    tell(sessions.values(), mid, Announce(state))


class Serving:
    """One-time peerwire tokens, the rules a request is served under, and where pieces lie."""

    def __init__(
        self,
        held: Held,
        store: PieceStore,
        stats: SwarmStats,
        is_banned: Callable[[str, bytes], bool],
        unchoked: Callable[[str], bool],
        budget: PeerBudget | None = None,
    ) -> None:
        self._held = held
        self._store = store
        self._stats = stats
        self._is_banned = is_banned
        self._unchoked = unchoked
        self._budget = budget or PeerBudget()
        # token -> (peer, when issued); each peer's live tokens in issue order
        self._tokens: dict[bytes, tuple[str, float]] = {}
        self._by_peer: dict[str, list[bytes]] = {}
        self._conns: dict[str, int] = {}  # open peerwire connections per peer
        self.served: dict[str, int] = {}  # bytes served per peer (the choker's order)

    def issue_token(self, peer_id: str) -> bytes:
        """A one-time peerwire token for ``peer_id``: at most ``budget.tokens`` live (the oldest goes)."""
        tok = new_token()
        self._tokens[tok] = (peer_id, trio.current_time())
        live = self._by_peer.setdefault(peer_id, [])
        live.append(tok)
        while len(live) > self._budget.tokens:
            self._tokens.pop(live.pop(0), None)
        return tok

    def live_tokens(self, peer_id: str) -> int:
        return len(self._by_peer.get(peer_id, ()))

    def open_conns(self, peer_id: str) -> int:
        return self._conns.get(peer_id, 0)

    def redeem(self, token: bytes) -> Grant | None:
        """The grant for ``token`` (once); None if unknown, expired, or its peer has its connections open."""
        found = self._tokens.pop(token, None)
        if found is None:
            return None
        peer, issued = found
        live = self._by_peer.get(peer)
        if live is not None:
            live.remove(token)
            if not live:
                del self._by_peer[peer]
        if trio.current_time() - issued > self._budget.token_ttl:
            return None
        if self._conns.get(peer, 0) >= self._budget.peerwire_conns:
            log.info("peer %s already has %d peerwire connections: refused", peer, self._conns[peer])
            return None
        self._conns[peer] = self._conns.get(peer, 0) + 1
        return Grant(self, peer)

    def conn_closed(self, peer_id: str) -> None:
        n = self._conns.get(peer_id, 0) - 1
        if n > 0:
            self._conns[peer_id] = n
        else:
            self._conns.pop(peer_id, None)

    def forget_peer(self, peer_id: str) -> None:
        """Tokens a peer never redeemed die with its session."""
        for tok in self._by_peer.pop(peer_id, []):
            self._tokens.pop(tok, None)

    def check(self, peer_id: str, manifest_id: bytes, index: int) -> RejectReason | None:
        if self._is_banned(peer_id, manifest_id):
            return RejectReason.BANNED
        if not self._unchoked(peer_id):
            return RejectReason.CHOKED
        if manifest_id not in self._held:
            return RejectReason.UNKNOWN_MANIFEST
        if not self._held.has(manifest_id, index):
            return RejectReason.NOT_HAVE
        return None

    def count_served(self, peer_id: str, nbytes: int) -> None:
        self._stats.up_bytes += nbytes
        self.served[peer_id] = self.served.get(peer_id, 0) + nbytes

    def locate(self, manifest_id: bytes, index: int) -> PieceLocation | None:
        """Serve only what this node has verified: the held bitfield, then the store's location."""
        if not self._held.has(manifest_id, index):
            return None
        try:
            loc = self._store.piece_location(manifest_id, index)
        except (StorageError, KeyError, IndexError):
            return None
        trusted = self._store.written_here(manifest_id, index)
        return dataclasses.replace(loc, trusted=trusted)
