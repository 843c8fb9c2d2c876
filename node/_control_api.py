"""The local control API: newline-delimited JSON over a unix socket in the data directory.

Only processes that can open ``DATA_DIR/control.sock`` (mode 0600, so the
same user) reach it; it never listens on the network. One request line per
connection:

* ``{"op": "status"}`` -> one line, the node's status.
* ``{"op": "fetch", "manifest": PATH|URL, "out": DIR, "mirrors": [...],
  "trust": [KEY.pub paths], "roots": [CA.pem paths], "spiffe_ids": [...], "files": [paths] or null,
  "headers": {...}, "mirror_headers": {URL: {...}}, "mirror_config": {...}, "options": {...}}``
  (the fields of :meth:`FetchPlan.to_wire`; all but ``manifest`` and ``out`` optional)
  -> progress events, one per line (the
  ``--json`` form of node/_progress.py), then ``{"event": "result", ...}`` or
  ``{"event": "error", "message": ..., "kind": ...}``. The running node keeps
  serving the model afterwards. With ``"name": NAME`` instead of
  ``"manifest"``, the node resolves the signed name record of a trusted
  publisher in the DHT and fetches the manifest itself from peers.
* ``{"op": "name_publish", "key": KEYFILE, "manifest": PATH, "seq": N or null, "rollout": PPM or null,
  "preheat": {"out": DIR, "mirrors": [...]} or null}``
  -> ``{"event": "name-published", ...}``: NAME now points at this manifest
  (with ``preheat``, once this node holds every piece of it: node/_follow.py).
* ``{"op": "update", "name": NAME | "manifest": PATH|URL, "root": DIR or null, "keep": K, ...fetch fields}``
  -> progress events, then ``{"event": "updated", ...}`` or an error line:
  fetch the version into its own directory, gate it, switch ``current``
  (node/_update.py; the fields are those of ``fetch`` but ``out``).
* ``{"op": "withdraw", "manifest_ids": [hex, ...]}`` -> ``{"event": "withdrawn", "unheld": [hex, ...]}``:
  the store forgot these manifests' downloads (``gc`` or ``rollback`` removed
  versions); the node re-reads what it holds of each and tells peers, and
  stops announcing those with nothing left (``unheld``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from autoglm.node._control_client import socket_path
from autoglm.node._keys import load_private_key, load_trust_policy
from autoglm.node._manifests import load_signed_manifest
from autoglm.node._plan import FetchPlan
from autoglm.node._progress import Event, ProgressSnapshot, to_json
from autoglm.node.errors import AutoglmError, ConfigError

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from autoglm.node._swarm_node import SwarmNode

__all__ = ["serve_control_api"]

log = logging.getLogger(__name__)

_MAX_LINE = 64 * 1024
_MAX_WITHDRAW = 1024  # manifest ids in one withdraw request
#: A fetch's events reach its client in at most one write per this many seconds (see _forward).
FORWARD_INTERVAL = 0.1


async def _send(stream: trio.abc.Stream, value: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(value, sort_keys=True).encode() + b"\n")


async def _read_line(stream: trio.abc.Stream) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > _MAX_LINE:
            raise ConfigError("control request too long")
    return buf.split(b"\n", 1)[0]


async def _handle(stream: trio.SocketStream, node: SwarmNode) -> None:
    try:
        with trio.fail_after(10):
            req = json.loads(await _read_line(stream) or b"{}")
        op = req.get("op") if isinstance(req, dict) else None
        if op == "status":
            await _send(stream, node.status())
        elif op == "fetch":
            await _fetch(stream, node, req)
        elif op == "name_publish":
            await _name_publish(stream, node, req)
        elif op == "update":
            from autoglm.node._follow import control_update

            await control_update(stream, node, req)
        elif op == "withdraw":
            await _withdraw(stream, node, req)
        else:
            await _send(stream, {"event": "error", "message": f"unknown op {op!r}", "kind": "ConfigError"})
    except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ValueError) as eg:
        log.debug("control client went away: %r", eg.exceptions[0])
    except* Exception:  # the per-client supervisor: a client's failure never stops the node
        log.exception("control request failed")
    finally:
        await stream.aclose()


async def _forward(stream: trio.abc.Stream, recv: trio.MemoryReceiveChannel[Event], interval: float = FORWARD_INTERVAL) -> None:
    """Relay a fetch's events to the client: every event, in order, in at most one write per ``interval``.

    Strategy: a write wakes the client process, which reads, parses and
    prints; one write per event costs both processes a context switch each
    time. The first event of a batch waits at most ``interval`` for others,
    and a progress snapshot superseded by a later one in the same batch is
    left out (the later one carries every counter). The channel's end (the
    fetch is over) flushes at once; so does a cancellation, shielded and
    bounded, so the client sees the last events before the error line.
    """
    batch: list[Event] = []
    async with recv:
        try:
            while True:
                try:
                    batch.append(await recv.receive())
                except trio.EndOfChannel:
                    return
                over = False
                with trio.move_on_after(interval):
                    while not over:
                        try:
                            batch.append(await recv.receive())
                        except trio.EndOfChannel:
                            over = True
                await _send_batch(stream, batch)
                batch = []
                if over:
                    return
        except BaseException:
            if batch:  # cancelled (the fetch failed): what it said before goes out first
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await _send_batch(stream, batch)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            raise


async def _send_batch(stream: trio.abc.Stream, batch: list[Event]) -> None:
    last_progress = max((i for i, ev in enumerate(batch) if isinstance(ev, ProgressSnapshot)), default=-1)
    lines = [json.dumps(to_json(ev), sort_keys=True).encode() + b"\n" for i, ev in enumerate(batch)
             if i == last_progress or not isinstance(ev, ProgressSnapshot)]
    await stream.send_all(b"".join(lines))


async def _fetch(stream: trio.SocketStream, node: SwarmNode, req: dict[str, Any]) -> None:
    send, recv = trio.open_memory_channel[Event](64)
    try:
        trust = load_trust_policy(
            node.config.data_dir, [Path(p) for p in req.get("trust", [])], [Path(p) for p in req.get("roots", [])],
            [str(x) for x in req.get("spiffe_ids", [])],
        )
        async with trio.open_nursery() as nursery:

            nursery.start_soon(_forward, stream, recv)
            resolved = None if "manifest" in req else await node.resolve_name(str(req["name"]), trust)
            plan = FetchPlan.from_wire(req, trust, resolved)
            result = await node.hold(plan, events=send)
        await _send(
            stream,
            {
                "event": "result",
                "manifest_id": result.manifest_id.hex(),
                "out_dir": result.out_dir,
                "bytes_total": result.bytes_total,
                "bytes_by_source": result.bytes_by_source,
                "received_by_source": result.received_by_source,
                "seconds": round(result.seconds, 3),
            },
        )
    except* (AutoglmError, KeyError) as eg:
        exc = eg.exceptions[0]
        await _send(stream, {"event": "error", "message": str(exc), "kind": type(exc).__name__})


async def _name_publish(stream: trio.SocketStream, node: SwarmNode, req: dict[str, Any]) -> None:
    try:
        key = await trio.to_thread.run_sync(load_private_key, Path(req["key"]))
        signed = await trio.to_thread.run_sync(load_signed_manifest, Path(req["manifest"]))
        if req.get("preheat"):
            from autoglm.node._follow import preheat

            await preheat(node, signed, req["preheat"])
        rec = await node.publish_name(key, signed, req.get("seq"), _rollout(req))
    except (AutoglmError, KeyError) as exc:
        await _send(stream, {"event": "error", "message": str(exc), "kind": type(exc).__name__})
        return
    await _send(stream, {"event": "name-published", "key": rec.key, "manifest_id": rec.manifest_id.hex(),
                         "version": rec.version, "seq": rec.seq, "rollout": rec.rollout})


async def _withdraw(stream: trio.SocketStream, node: SwarmNode, req: dict[str, Any]) -> None:
    ids = req.get("manifest_ids")
    try:
        if not isinstance(ids, list) or len(ids) > _MAX_WITHDRAW or not all(isinstance(x, str) for x in ids):
            raise ValueError
        mids = [bytes.fromhex(x) for x in ids]
    except ValueError:
        await _send(stream, {"event": "error", "message": f"withdraw: manifest_ids is a list of at most "
                             f"{_MAX_WITHDRAW} hex ids", "kind": "ConfigError"})
        return
    unheld = []
    for mid in mids:
        if mid in node.swarm.held:
            await node.swarm.withdraw(mid)
            if mid not in node.swarm.held:
                unheld.append(mid.hex())
    await _send(stream, {"event": "withdrawn", "unheld": unheld})


def _rollout(req: dict[str, Any]) -> int:
    value = req.get("rollout")
    if value is None:
        return 1_000_000
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError("name_publish: rollout is parts per million (an integer)")
    return value


async def serve_control_api(
    node: SwarmNode, data_dir: Path, *, task_status: TaskStatus[Path] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on DATA_DIR/control.sock until cancelled; the socket file is removed on exit."""
    path = socket_path(data_dir)

    try:
        probe = await trio.open_unix_socket(str(path))
    except OSError:
        pass
    else:
        await probe.aclose()
        raise ConfigError(f"a node is already running with data directory {data_dir}")

    def prepare() -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # left behind by a node killed with SIGKILL

    await trio.to_thread.run_sync(prepare)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            await trio.serve_listeners(lambda s: _handle(s, node), [listener], handler_nursery=nursery)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
