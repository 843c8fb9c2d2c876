"""A hostile peer for the swarm integration tests: a real libp2p host speaking our protocols, lying.

It runs the node's own swarm (control protocol, peerwire server, DHT) over a
piece store that lies, so everything but the lie is what a real node does:

* ``corrupt``: holds every piece of the manifest and serves each one with its
  first byte flipped, from a corrupted copy of the model that it calls
  verified (so the bytes go out by sendfile, unchecked);
* ``lie``: claims every piece of the manifest and has none of them (every
  request is refused: NOT_HAVE).

Run as a program: ``python adversary.py MODE --data-dir D --model DIR
--manifest M.agm [--bootstrap ADDR] [--upload-slots N]``. Its first stdout
line is ``{"event": "ready", "addrs": [...], "peer_id": ...}`` (as `join
--json` prints); SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from pathlib import Path

import trio

from autoglm.node._manifests import load_signed_manifest
from autoglm.node._p2p import DEFAULT_LISTEN, open_p2p
from autoglm.node._store import PieceLocation
from autoglm.node.errors import StorageError
from autoglm.node.swarm import Swarm, SwarmConfig
from autoglm.protocol import Manifest, SignedManifest
from autoglm.protocol._bitfield import Bitfield


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


async def main(args: argparse.Namespace) -> None:
    signed = load_signed_manifest(args.manifest)
    copy = None
    if args.mode == "corrupt":
        copy = args.data_dir / "corrupt"
        corrupt_copy(args.model, signed.manifest, copy)
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
    parser.add_argument("mode", choices=["corrupt", "lie"])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--upload-slots", type=int, default=8)
    trio.run(main, parser.parse_args(sys.argv[1:]))
