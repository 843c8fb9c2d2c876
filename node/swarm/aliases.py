"""Identical files under other manifests: a peer holding our pieces under another manifest serves them.

While fetching, a node asks its session peers for the manifests they hold
that it does not know (GetManifest, at most ``_MAX_PROBED``), maps pieces by
(BLAKE3 hash, length) and makes each such peer an *alias* source of the
fetch. The envelope is only a map of hashes; nothing in it is trusted, every
byte is checked against our own manifest. Unasked envelopes are dropped: a
peer cannot fill our memory with them.
"""

from __future__ import annotations

from collections.abc import Mapping

from autoglm.protocol import decode_signed_manifest
from autoglm.protocol._control import GetManifest, ManifestData
from autoglm.protocol._errors import RemoteProtocolError

from .fetches import Fetches
from .session import Session

__all__ = ["Aliases"]

_MAX_PROBED = 64  # other manifests a node asks its peers for ...
_MAX_FOREIGN_PIECES = 500_000  # ... and the piece hashes it keeps of them (~60 MB at most)


class Aliases:
    """The piece maps of other manifests that peers hold, and the alias sources made from them."""

    def __init__(self, sessions: Mapping[str, Session], fetches: Fetches, envelopes: Mapping[bytes, bytes]) -> None:
        self._sessions = sessions
        self._fetches = fetches
        self._envelopes = envelopes
        self._asked: set[bytes] = set()
        self._foreign: dict[bytes, list[tuple[bytes, int]]] = {}  # manifest id -> (hash, length) per piece

    def probe(self, s: Session) -> None:
        """While fetching, ask ``s`` for the manifests it holds that we do not know yet."""
        if not self._fetches:
            return
        for mid, bf in s.manifests().items():
            if mid in self._fetches or not len(bf):
                continue
            if mid in self._foreign:
                self._link(s, mid)
            elif mid not in self._asked and len(self._asked) < _MAX_PROBED:
                self._asked.add(mid)
                if mid in self._envelopes:
                    self._learn(mid, self._envelopes[mid])
                else:
                    s.post(GetManifest(mid))

    def on_manifest_data(self, msg: ManifestData) -> None:
        """An envelope we asked for: learn its piece map."""
        if msg.envelope and msg.manifest_id in self._asked and msg.manifest_id not in self._foreign:
            self._learn(msg.manifest_id, msg.envelope)

    def _learn(self, mid: bytes, envelope: bytes) -> None:
        try:
            signed = decode_signed_manifest(envelope)
        except RemoteProtocolError:
            return
        held = sum(len(k) for k in self._foreign.values())
        if signed.id != mid or held + signed.manifest.piece_count > _MAX_FOREIGN_PIECES:
            return
        self._foreign[mid] = [(p.hash, p.length) for _, p in signed.manifest.iter_pieces()]
        for s in list(self._sessions.values()):
            if s.bitfield(mid) is not None:
                self._link(s, mid)

    def _link(self, s: Session, held_as: bytes) -> None:
        """Make ``s`` a source of a fetched manifest for the pieces it holds under ``held_as``."""
        if held_as in s.aliases:
            return
        theirs = {key: j for j, key in enumerate(self._foreign[held_as])}
        for mid, fetch in self._fetches.items():
            if mid == held_as or self._fetches.is_banned(s.peer_id, mid):
                continue
            mapping = {i: theirs[key] for i, key in enumerate(fetch.piece_keys()) if key in theirs}
            if mapping:
                self._fetches.offer_alias(s, mid, held_as, mapping)
                return
