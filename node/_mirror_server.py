"""A small static HTTP/1.1 mirror: GET/HEAD, single Range, ETag, keep-alive.

Good enough to seed a fleet from one box (`autoglm-node serve-mirror DIR`) and
for the demo; any static server (nginx, S3, a Hugging Face mirror) works as a
mirror too. It counts the body bytes it sends, which the demo reports as
origin egress.
"""

from __future__ import annotations

import email.utils
import os
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

import h11
import trio

if TYPE_CHECKING:
    # trio-typing (pulled in by libp2p) ships stubs that shadow trio's own types.
    from trio_typing import TaskStatus

__all__ = ["MirrorStats", "serve_mirror"]

_CHUNK = 4 << 20
_MAX_HEADER = 16 * 1024
_IDLE_TIMEOUT = 60.0


@dataclass(slots=True)
class MirrorStats:
    requests: int = 0
    body_bytes: int = 0
    by_path: dict[str, int] = field(default_factory=dict)


def _resolve(root: Path, target: bytes) -> Path | None:
    path = urllib.parse.unquote(urllib.parse.urlsplit(target.decode("latin-1")).path)
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") or "\x00" in p or "\\" in p for p in parts):
        return None
    full = root.joinpath(*parts) if parts else root
    try:
        full = full.resolve()
        full.relative_to(root)
    except (ValueError, OSError):
        return None
    return full if full.is_file() else None


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """bytes=a-b | a- | -n -> (start, end_exclusive); None if unsatisfiable or multi-range."""
    if not value.startswith("bytes=") or "," in value:
        return None
    first, _, last = value[6:].strip().partition("-")
    try:
        if first == "":
            n = int(last)
            return (max(0, size - n), size) if n > 0 and size > 0 else None
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        return None
    end = min(end, size)
    return (start, end) if 0 <= start < end else None


async def _handle(stream: trio.SocketStream, root: Path, stats: MirrorStats) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            with trio.move_on_after(_IDLE_TIMEOUT) as scope:
                data = await stream.receive_some(65536)
            if scope.cancelled_caught:
                return
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            await _respond(stream, conn, event, root, stats)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
                continue
            return
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return


async def _respond(stream: trio.SocketStream, conn: h11.Connection, req: h11.Request, root: Path, stats: MirrorStats) -> None:
    stats.requests += 1
    while not isinstance(conn.next_event(), h11.EndOfMessage):
        pass
    if req.method not in (b"GET", b"HEAD"):
        await _simple(stream, conn, 405, b"method not allowed\n")
        return
    path = _resolve(root, req.target)
    if path is None:
        await _simple(stream, conn, 404, b"not found\n")
        return
    st = path.stat()
    etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in req.headers}
    start, end, status = 0, st.st_size, 200
    rng = headers.get("range")
    if rng is not None and headers.get("if-range", etag) == etag:
        r = _parse_range(rng, st.st_size)
        if r is None:
            await _simple(stream, conn, 416, b"", [("Content-Range", f"bytes */{st.st_size}")])
            return
        (start, end), status = r, 206
    out = [
        ("Content-Length", str(end - start)),
        ("Content-Type", "application/octet-stream"),
        ("Accept-Ranges", "bytes"),
        ("ETag", etag),
        ("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True)),
    ]
    if status == 206:
        out.append(("Content-Range", f"bytes {start}-{end - 1}/{st.st_size}"))
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=out, reason=HTTPStatus(status).phrase)) or b"")
    if req.method == b"GET":
        rel = path.relative_to(root).as_posix()
        fd = os.open(path, os.O_RDONLY)
        try:
            pos = start
            while pos < end:
                # Reads go to a worker thread so a cold disk never stalls other clients.
                chunk = await trio.to_thread.run_sync(os.pread, fd, min(_CHUNK, end - pos), pos)
                if not chunk:
                    break
                for part in conn.send_with_data_passthrough(h11.Data(data=chunk)) or ():
                    await stream.send_all(part)
                pos += len(chunk)
                stats.body_bytes += len(chunk)
                stats.by_path[rel] = stats.by_path.get(rel, 0) + len(chunk)
        finally:
            os.close(fd)
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def _simple(stream: trio.SocketStream, conn: h11.Connection, status: int, body: bytes,
                  extra: list[tuple[str, str]] | None = None) -> None:
    headers = [("Content-Length", str(len(body))), ("Content-Type", "text/plain"), *(extra or [])]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase)) or b"")
    if body:
        await stream.send_all(conn.send(h11.Data(data=body)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def serve_mirror(
    root: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    stats: MirrorStats | None = None,
    *,
    task_status: TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``root`` until cancelled; reports (host, port) through task_status."""
    root = root.resolve()  # noqa: ASYNC240 (once, at start-up)
    stats = stats if stats is not None else MirrorStats()
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _handle(stream, root, stats)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started((bound[0], bound[1]))
