"""A hostile peer for the swarm integration tests: a real libp2p host speaking our protocols, lying.

It runs the node's own swarm (control protocol, peerwire server, DHT) over a
piece store that lies, so everything but the lie is what a real node does:

* ``corrupt``: holds every piece of the manifest and serves each one with its
  first byte flipped, from a corrupted copy of the model that it calls
  verified (so the bytes go out by sendfile, unchecked);
* ``lie``: claims every piece of the manifest and has none of them (every
  request is refused: NOT_HAVE);
* ``trickle``: holds every piece, with the right bytes, and sends each one
  byte every ``TRICKLE_EVERY`` seconds (issue 11, item 14): never silent
  long enough for the stall timeout, never done;
* ``attack``: no swarm of its own; opens control sessions to ``--target``
  (a multiaddr) and runs the scripted attacks of issue 11 on each, one
  session per attack (``--attacks``, comma-separated, default all of
  :data:`ATTACKS`), printing one ``{"event": "attack", "name": ...,
  "disconnected": bool, "received": bytes, "seconds": s}`` line per attack
  and ``{"event": "attacks-done"}`` at the end.

Run as a program: ``python adversary.py MODE --data-dir D --model DIR
--manifest M.agm [--bootstrap ADDR] [--upload-slots N]``. Its first stdout
line is ``{"event": "ready", "addrs": [...], "peer_id": ...}`` (as `join
--json` prints); SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import trio

from autoglm.node import _peerwire
from autoglm.node._manifests import load_signed_manifest
from autoglm.node._p2p import DEFAULT_LISTEN, ControlStream, P2PNode, PeerAddr, open_p2p
from autoglm.node._store import PieceLocation
from autoglm.node.errors import AutoglmError, StorageError
from autoglm.node.swarm import Swarm, SwarmConfig
from autoglm.protocol import Manifest, SignedManifest
from autoglm.protocol._bitfield import Bitfield
from autoglm.protocol._control import (
    Announce,
    ControlConnection,
    GetManifest,
    Hello,
    ManifestState,
    PeerInfo,
    Peers,
    TokenRequest,
    encode_control,
)


class LyingStore:
    """The PieceStore the swarm serves from: one manifest, every piece claimed."""

    def __init__(self, signed: SignedManifest, copy: Path | None) -> None:
        self.signed = signed
        self.copy = copy  # the corrupted model, or None: no piece at all
        self._locs: list[PieceLocation] = []
        for f in signed.manifest.files:
            for p in f.pieces:
                path = (copy or Path("/nonexistent")) / f.path
                self._locs.append(PieceLocation(path, p.offset, p.length, p.hash))

    def manifest_ids(self) -> list[bytes]:
        return [self.signed.id]

    def manifest(self, manifest_id: bytes) -> Manifest:
        if manifest_id != self.signed.id:
            raise StorageError("not held")
        return self.signed.manifest

    def bitfield(self, manifest_id: bytes) -> bytes:
        n = self.signed.manifest.piece_count
        return Bitfield(n, range(n)).to_bytes()

    def piece_location(self, manifest_id: bytes, index: int) -> PieceLocation:
        if self.copy is None or manifest_id != self.signed.id:
            raise StorageError(f"piece {index} is not here")
        return self._locs[index]

    def written_here(self, manifest_id: bytes, index: int) -> bool:
        return True  # "verified and written by this process": served as it is


TRICKLE_EVERY = 4.0  # seconds between the bytes of a trickling peer (the stall timeout is 15 s)


async def _trickle(sock: trio.socket.SocketType, fd: int, offset: int, count: int) -> None:
    """Stands in for the peerwire server's sendfile: the right bytes, one every TRICKLE_EVERY seconds."""
    for k in range(count):
        await sock.send(os.pread(fd, 1, offset + k))
        await trio.sleep(TRICKLE_EVERY)


def corrupt_copy(model: Path, manifest: Manifest, dest: Path) -> None:
    """The model's files with the first byte of every piece flipped."""
    for f in manifest.files:
        out = dest / f.path
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model / f.path, out)
        with open(out, "r+b") as fh:
            for p in f.pieces:
                fh.seek(p.offset)
                b = fh.read(1)
                fh.seek(p.offset)
                fh.write(bytes([b[0] ^ 0xFF]))


# -- scripted attacks on a real node (issue 11) ----------------------------------------
# Each returns the frames to send after Hello; the session is then read until
# the node ends it or ATTACK_WAIT passes.


def _flood_announce(mid: bytes) -> list[bytes]:
    """Item 6: Announces with fresh ids and 250 KB bitfields (80 of them kept 19 MiB)."""
    bits = b"\xff" * 250_000
    return [encode_control(Announce(ManifestState(k.to_bytes(32, "big"), 2_000_000, bits))) for k in range(80)]


def _flood_peers(mid: bytes) -> list[bytes]:
    """Item 7: 200 Peers messages with fresh ids and addresses the node must never dial."""
    addrs = ("/ip4/10.11.12.13/tcp/22", "/ip4/169.254.169.254/tcp/80", "/dns4/victim.example/tcp/443")
    return [
        encode_control(Peers(mid, tuple(PeerInfo(f"12D3KooWfake{m:04d}{k:02d}", addrs) for k in range(50))))
        for m in range(200)
    ]


def _flood_get_manifest(mid: bytes) -> list[bytes]:
    """Item 5: 12 KB of GetManifest for a held manifest (75 MiB of replies before)."""
    return [encode_control(GetManifest(mid)) for _ in range(300)]


def _flood_tokens(mid: bytes) -> list[bytes]:
    """Item 6: 20,000 TokenRequests (each token could open a peerwire connection)."""
    return [encode_control(TokenRequest()) for _ in range(20_000)]


ATTACKS = {
    "announce": _flood_announce,
    "peers": _flood_peers,
    "get-manifest": _flood_get_manifest,
    "tokens": _flood_tokens,
}
ATTACK_WAIT = 10.0


async def _open(p2p: P2PNode, target: PeerAddr) -> ControlStream:
    """A fresh control stream; the node may just have torn down the last connection (3 tries)."""
    for attempt in range(3):
        try:
            return await p2p.open_control(target)
        except AutoglmError:
            if attempt == 2:
                raise
            await trio.sleep(1.0)
    raise AssertionError("unreachable")


async def _attack(p2p: P2PNode, target: PeerAddr, name: str, mid: bytes) -> dict[str, object]:
    stream = await _open(p2p, target)
    conn = ControlConnection(trio.current_time())
    received = 0
    disconnected = False
    t0 = trio.current_time()
    try:
        await stream.send_all(conn.send(Hello((), None, b"\0" * 16), trio.current_time()))
        frames = ATTACKS[name](mid)

        async def send() -> None:
            nonlocal disconnected
            try:
                for k in range(0, len(frames), 64):
                    await stream.send_all(b"".join(frames[k : k + 64]))
            except trio.BrokenResourceError:
                disconnected = True  # the node ended the session while we were still sending

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            with trio.move_on_after(ATTACK_WAIT):
                try:
                    while data := await stream.receive_some(1 << 20):
                        received += len(data)
                except trio.BrokenResourceError:
                    pass  # reset rather than closed: ended all the same
                disconnected = True
            nursery.cancel_scope.cancel()
    except trio.BrokenResourceError:
        disconnected = True
    finally:
        await stream.aclose()
    return {"event": "attack", "name": name, "disconnected": disconnected, "received": received,
            "seconds": round(trio.current_time() - t0, 3)}


async def run_attacks(args: argparse.Namespace) -> None:
    signed = load_signed_manifest(args.manifest)
    target = PeerAddr(args.target.rsplit("/p2p/", 1)[1], (args.target,))
    names = args.attacks.split(",") if args.attacks else list(ATTACKS)
    async with open_p2p(args.data_dir, (DEFAULT_LISTEN,), ()) as p2p:
        print(json.dumps({"event": "ready", "addrs": p2p.addrs(), "peer_id": p2p.peer_id}), flush=True)
        for name in names:
            print(json.dumps(await _attack(p2p, target, name, signed.id)), flush=True)
        print(json.dumps({"event": "attacks-done"}), flush=True)


async def main(args: argparse.Namespace) -> None:
    if args.mode == "attack":
        await run_attacks(args)
        return
    signed = load_signed_manifest(args.manifest)
    copy = None
    if args.mode == "corrupt":
        copy = args.data_dir / "corrupt"
        corrupt_copy(args.model, signed.manifest, copy)
    elif args.mode == "trickle":
        copy = args.model  # the right bytes ...
        _peerwire._sendfile = _trickle  # ... at a trickle (this hostile program's own server)
    store = LyingStore(signed, copy)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_p2p(args.data_dir, (DEFAULT_LISTEN,), tuple(args.bootstrap)) as p2p, trio.open_nursery() as nursery:
            swarm = Swarm(p2p, store, SwarmConfig(upload_slots=args.upload_slots))
            await nursery.start(swarm.run)
            n = signed.manifest.piece_count
            swarm.start_holding(signed.id, n, range(n), signed.encode())
            print(json.dumps({"event": "ready", "addrs": p2p.addrs(), "peer_id": p2p.peer_id}), flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["corrupt", "lie", "trickle", "attack"])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--upload-slots", type=int, default=8)
    parser.add_argument("--target", help="attack: the node's multiaddr (.../p2p/ID)")
    parser.add_argument("--attacks", default="", help="attack: comma-separated names (default: all)")
    trio.run(main, parser.parse_args(sys.argv[1:]))
