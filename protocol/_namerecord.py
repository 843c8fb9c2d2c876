"""Signed name records: "the latest manifest of model NAME by publisher KEY".

A record lives in the DHT under ``/agname/<key id>/<name>``. Its value is
``canonical msgpack {key, manifest, name, seq, sig, v, version}`` where
``sig`` is Ed25519 by ``key`` over ``DOMAIN_NAME || canonical {key, manifest,
name, seq, v, version}``. The domain tag differs from the manifest one, so a
manifest signature can never pass as a name-record signature or back.

The validator refuses unsigned records, bad signatures, a record stored under
another publisher's or model's key, and any update whose sequence number is
lower than the one already held; among valid records the highest ``seq`` wins.

Staged roll-out (record version 2): the signed map also holds ``rollout``,
the share of followers, in parts per million (1..1,000,000), that take the
record's manifest now. A v1 record (no ``rollout``) is a full roll-out and is
what :func:`sign_name_record` still writes when no share is given, so nodes
that know only v1 keep working with every full roll-out. The share is inside
the signed bytes: a relay cannot widen or narrow it. :func:`rollout_admits`
says which followers are in: a pure function of the follower's peer id and
the manifest id, so the followers in at 10 % are still in at 50 %.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ._codec import Limits, decode_canonical, encode_canonical
from ._errors import LocalProtocolError, RemoteProtocolError, SignatureError
from ._signing import key_id, verify_signature

__all__ = [
    "DOMAIN_NAME",
    "NAME_NAMESPACE",
    "ROLLOUT_FULL",
    "NameRecord",
    "check_name_update",
    "decode_name_record",
    "name_key",
    "rollout_admits",
    "select_name_record",
    "sign_name_record",
    "verify_name_record",
]

DOMAIN_NAME: Final = b"autoglm-node/name-record/v1\x00"
NAME_NAMESPACE: Final = "agname"
_VERSION: Final = 1
_VERSION_ROLLOUT: Final = 2
ROLLOUT_FULL: Final = 1_000_000  # parts per million: every follower
_ROLLOUT_TAG: Final = b"autoglm-node/rollout/v1\x00"
_MAX_NAME: Final = 256
_MAX_RECORD: Final = 2048
_SEQ_MAX: Final = 2**63 - 1


@dataclass(frozen=True, slots=True)
class NameRecord:
    public_key: bytes
    name: str
    manifest_id: bytes
    version: str
    seq: int
    signature: bytes
    rollout: int = ROLLOUT_FULL  # parts per million of followers that take it now

    @property
    def publisher(self) -> str:
        return key_id(self.public_key)

    @property
    def key(self) -> str:
        return name_key(self.publisher, self.name)

    def _signed_value(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "v": _VERSION,
            "key": self.public_key,
            "name": self.name,
            "manifest": self.manifest_id,
            "version": self.version,
            "seq": self.seq,
        }
        if self.rollout != ROLLOUT_FULL:
            value["v"] = _VERSION_ROLLOUT
            value["rollout"] = self.rollout
        return value

    def signed_bytes(self) -> bytes:
        return encode_canonical(self._signed_value())

    def encode(self) -> bytes:
        return encode_canonical({**self._signed_value(), "sig": self.signature})


def name_key(publisher_key_id: str, name: str) -> str:
    """The DHT key of NAME by the publisher with ``publisher_key_id``."""
    if not name or len(name) > _MAX_NAME:
        raise LocalProtocolError(f"a model name is 1..{_MAX_NAME} characters")
    return f"/{NAME_NAMESPACE}/{publisher_key_id}/{name}"


def sign_name_record(
    key: Ed25519PrivateKey, name: str, manifest_id: bytes, version: str, seq: int, rollout: int = ROLLOUT_FULL
) -> NameRecord:
    """A new record; ``seq`` must exceed that of every earlier record for NAME.

    ``rollout`` (parts per million, 1..ROLLOUT_FULL) below ROLLOUT_FULL makes a
    v2 record that only that share of followers takes now.
    """
    if len(manifest_id) != 32 or not 0 <= seq <= _SEQ_MAX or not name or len(name) > _MAX_NAME:
        raise LocalProtocolError("bad name record fields")
    if isinstance(rollout, bool) or not 1 <= rollout <= ROLLOUT_FULL:
        raise LocalProtocolError(f"a roll-out share is 1..{ROLLOUT_FULL} parts per million")
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    unsigned = NameRecord(pub, name, manifest_id, version, seq, b"", rollout)
    return NameRecord(pub, name, manifest_id, version, seq, key.sign(DOMAIN_NAME + unsigned.signed_bytes()), rollout)


def rollout_admits(peer_id: str, manifest_id: bytes, rollout: int) -> bool:
    """Whether the follower ``peer_id`` takes a manifest offered to ``rollout`` ppm of followers.

    The follower's bucket (0..ROLLOUT_FULL-1) is a hash of its peer id and the
    manifest id, so each version picks its own first followers, and raising
    the share for the same manifest only adds followers, never drops one.
    """
    if rollout >= ROLLOUT_FULL:
        return True
    digest = hashlib.sha256(_ROLLOUT_TAG + manifest_id + peer_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % ROLLOUT_FULL < rollout


def decode_name_record(data: bytes) -> NameRecord:
    """Parse a record (signature not checked); RemoteProtocolError if malformed or unsigned."""
    if len(data) > _MAX_RECORD:
        raise RemoteProtocolError(f"name record is {len(data)} bytes; the limit is {_MAX_RECORD}")
    v = decode_canonical(data, Limits(max_bytes=_MAX_RECORD, max_str_len=_MAX_NAME, max_bin_len=64, max_map_len=8))
    if not isinstance(v, dict):
        raise RemoteProtocolError("name record is not a map")
    if "sig" not in v:
        raise SignatureError("name record is unsigned")
    fields = {"v", "key", "name", "manifest", "version", "seq", "sig"}
    if isinstance(v.get("v"), bool) or v.get("v") not in (_VERSION, _VERSION_ROLLOUT):
        raise RemoteProtocolError(f"unsupported name record version {v.get('v')!r}")
    if set(v) != (fields if v["v"] == _VERSION else fields | {"rollout"}):
        raise RemoteProtocolError("name record has unexpected or missing fields")
    rollout = v.get("rollout", ROLLOUT_FULL)
    # v2 exists only for a partial roll-out: one meaning has one encoding.
    if v["v"] == _VERSION_ROLLOUT and (isinstance(rollout, bool) or not isinstance(rollout, int)
                                       or not 1 <= rollout < ROLLOUT_FULL):
        raise RemoteProtocolError("name record roll-out share is malformed")
    pub, name, mid, ver, seq, sig = v["key"], v["name"], v["manifest"], v["version"], v["seq"], v["sig"]
    if not (isinstance(pub, bytes) and len(pub) == 32 and isinstance(mid, bytes) and len(mid) == 32):
        raise RemoteProtocolError("name record key or manifest id is not 32 bytes")
    if not (isinstance(name, str) and 0 < len(name) <= _MAX_NAME and isinstance(ver, str)):
        raise RemoteProtocolError("name record name or version is malformed")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= _SEQ_MAX:
        raise RemoteProtocolError("name record sequence number is malformed")
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise SignatureError("name record signature is not 64 bytes")
    return NameRecord(pub, name, mid, ver, seq, sig, rollout)


def verify_name_record(dht_key: str, data: bytes) -> NameRecord:
    """Decode and check a record stored under ``dht_key``; raise on any failure."""
    rec = decode_name_record(data)
    if rec.key != dht_key:
        raise SignatureError(f"name record for {rec.key} stored under {dht_key}")
    verify_signature(rec.public_key, rec.signature, DOMAIN_NAME, rec.signed_bytes())
    return rec


def check_name_update(dht_key: str, old: bytes | None, new: bytes) -> NameRecord:
    """Accept ``new`` in place of ``old``: valid, and not a lower sequence number.

    An equal sequence number is accepted only for the identical record, so a
    publisher cannot be made to appear to point one seq at two manifests.
    """
    rec = verify_name_record(dht_key, new)
    if old is not None:
        try:
            prev = verify_name_record(dht_key, old)
        except (RemoteProtocolError, SignatureError):
            return rec
        if rec.seq < prev.seq or (rec.seq == prev.seq and new != old):
            raise RemoteProtocolError(f"name record seq {rec.seq} does not supersede seq {prev.seq}")
    return rec


def select_name_record(dht_key: str, values: list[bytes]) -> int:
    """Index of the best valid record (highest seq); RemoteProtocolError if none is valid."""
    best, best_seq = -1, -1
    for i, data in enumerate(values):
        try:
            rec = verify_name_record(dht_key, data)
        except (RemoteProtocolError, SignatureError):
            continue
        if rec.seq > best_seq:
            best, best_seq = i, rec.seq
    if best < 0:
        raise RemoteProtocolError("no valid name record")
    return best
