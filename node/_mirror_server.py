"""A small static HTTP/1.1 mirror: GET/HEAD, single Range, ETag, keep-alive.

Good enough to seed a fleet from one box (`autoglm-node serve-mirror DIR`) and
for the demo; any static server (nginx, S3, a Hugging Face mirror) works as a
mirror too. It counts the body bytes it sends, which the demo reports as
origin egress.

Strategy: every client is a stranger, so every client has a budget
(`MirrorLimits`, docs/security.md): a whole request head must arrive within
`header_timeout` (not per read: a client trickling one byte at a time gains
nothing), a kept-alive connection may sit idle for `idle_timeout`, each write
of the response must progress within `send_timeout`, and at most
`max_connections` clients are served at once (the next ones get a 503 and are
closed). Requests never carry a body here (413, and the connection closes
without reading it), so a declared body that never comes costs nothing.
Dotfiles are never served: `.autoglm-partial/` and friends are not content.
"""

from __future__ import annotations

import email.utils
import os
import re
import stat as stat_mod
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

__all__ = ["MirrorLimits", "MirrorStats", "serve_mirror"]

_CHUNK = 4 << 20
_SEND_PART = 256 << 10  # one timed write; a reader slower than this per send_timeout is dropped
_MAX_HEADER = 16 * 1024
_RANGE = re.compile(r"bytes=(\d{0,18})-(\d{0,18})")


@dataclass(frozen=True, slots=True)
class MirrorLimits:
    """Per-client budgets of the mirror (docs/security.md)."""

    header_timeout: float = 10.0  # whole request head, from its first byte wait to its end
    idle_timeout: float = 15.0  # kept-alive connection between requests
    send_timeout: float = 30.0  # each 256 KiB of a response
    max_connections: int = 256


@dataclass(slots=True)
class MirrorStats:
    requests: int = 0
    body_bytes: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    refused_connections: int = 0


class _Close(Exception):
    """End this connection quietly (timeout or a response that closes it)."""


def _resolve(root: Path, target: bytes) -> Path | None:
    raw = target.decode("latin-1")
    if not raw.startswith("/"):
        return None  # absolute-form and asterisk-form targets are not for a static mirror
    path = urllib.parse.unquote(urllib.parse.urlsplit(raw).path)
    parts = [p for p in path.split("/") if p]
    # A leading dot covers ".", ".." and every dotfile (.git, .autoglm-partial, .env).
    if any(p.startswith(".") or "\x00" in p or "\\" in p for p in parts):
        return None
    full = root.joinpath(*parts) if parts else root
    try:
        full = full.resolve()
        full.relative_to(root)
    except (ValueError, OSError):
        return None
    return full


def _parse_range(value: str, size: int) -> tuple[int, int] | None | bool:
    """One `bytes=` range -> (start, end_exclusive).

    False: not a single well-formed byte range; the header is ignored (RFC 9110
    14.2), including several ranges, which a server may serve whole.
    None: well-formed but unsatisfiable (416).
    """
    m = _RANGE.fullmatch(value.strip())
    if m is None:
        return False
    first, last = m.group(1), m.group(2)
    if first == "":
        if last == "":
            return False
        n = int(last)
        return (max(0, size - n), size) if n > 0 and size > 0 else None
    start = int(first)
    if last and int(last) < start:
        return False
    end = min(int(last) + 1 if last else size, size)
    return (start, end) if start < end else None


async def _next_request(stream: trio.SocketStream, conn: h11.Connection, limits: MirrorLimits,
                        first: bool) -> h11.Request | None:
    """Read one request head within its deadline; None when the client is done."""
    # Idle wait until the first byte of a kept-alive request, then the header budget.
    deadline = trio.current_time() + (limits.header_timeout if first else limits.idle_timeout)
    started = first
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is not h11.NEED_DATA:
            return None  # ConnectionClosed or PAUSED after the peer's close
        with trio.move_on_at(deadline):
            data = await stream.receive_some(65536)
            if not started and data:
                started = True
                deadline = trio.current_time() + limits.header_timeout
            conn.receive_data(data)
            continue
        raise _Close


async def _handle(stream: trio.SocketStream, root: Path, stats: MirrorStats, limits: MirrorLimits) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER)
    first = True
    while True:
        try:
            req = await _next_request(stream, conn, limits, first)
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _simple(stream, conn, limits, exc.error_status_hint, b"bad request\n", close=True)
            return
        if req is None:
            return
        first = False
        await _respond(stream, conn, req, root, stats, limits)
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return  # MUST_CLOSE, or a body we refused to read
        conn.start_next_cycle()


async def _respond(stream: trio.SocketStream, conn: h11.Connection, req: h11.Request, root: Path,
                   stats: MirrorStats, limits: MirrorLimits) -> None:
    stats.requests += 1
    if sum(len(k) + len(v) for k, v in req.headers) + len(req.target) > _MAX_HEADER:
        # h11 bounds only a head that arrives in pieces; one that arrives whole is bounded here.
        await _simple(stream, conn, limits, 431, b"request header too large\n", close=True)
        return
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in req.headers}
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        # A mirror takes no request bodies; it answers without reading one and closes.
        await _simple(stream, conn, limits, 413, b"request bodies are not accepted\n", close=True)
        return
    if not isinstance(conn.next_event(), h11.EndOfMessage):  # no body: h11 has the end already
        raise _Close
    if req.method not in (b"GET", b"HEAD"):
        await _simple(stream, conn, limits, 405, b"method not allowed\n", extra=[("Allow", "GET, HEAD")])
        return
    path = _resolve(root, req.target)
    fd = _open_regular(path) if path is not None else None
    if path is None or fd is None:
        await _simple(stream, conn, limits, 404, b"not found\n")
        return
    try:
        await _send_file(stream, conn, req, headers, fd, path.relative_to(root).as_posix(), stats, limits)
    finally:
        os.close(fd)


def _open_regular(path: Path) -> int | None:
    """An fd of a regular file at ``path`` (already resolved inside root), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat_mod.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device must not be read
        os.close(fd)
        return None
    return fd


async def _send_file(stream: trio.SocketStream, conn: h11.Connection, req: h11.Request,
                     headers: dict[str, str], fd: int, rel: str, stats: MirrorStats,
                     limits: MirrorLimits) -> None:
    st = os.fstat(fd)
    size = st.st_size
    etag = f'"{size:x}-{st.st_mtime_ns:x}"'
    start, end, status = 0, size, 200
    rng = headers.get("range")
    if rng is not None and headers.get("if-range", etag) == etag:
        r = _parse_range(rng, size)
        if r is None:
            await _simple(stream, conn, limits, 416, b"", extra=[("Content-Range", f"bytes */{size}")])
            return
        if r is not False:
            assert isinstance(r, tuple)
            (start, end), status = r, 206
    out = [
        ("Content-Length", str(end - start)),
        ("Content-Type", "application/octet-stream"),
        ("Accept-Ranges", "bytes"),
        ("ETag", etag),
        ("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True)),
    ]
    if status == 206:
        out.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
    await _send(stream, limits, conn.send(h11.Response(status_code=status, headers=out,
                                                        reason=HTTPStatus(status).phrase)))
    if req.method == b"GET":
        pos = start
        while pos < end:
            # Reads go to a worker thread so a cold disk never stalls other clients.
            chunk = await trio.to_thread.run_sync(os.pread, fd, min(_CHUNK, end - pos), pos)
            if not chunk:
                raise _Close  # the file shrank under us: the response cannot be completed
            for part in conn.send_with_data_passthrough(h11.Data(data=chunk)) or ():
                await _send(stream, limits, part)
            pos += len(chunk)
            stats.body_bytes += len(chunk)
            stats.by_path[rel] = stats.by_path.get(rel, 0) + len(chunk)
    await _send(stream, limits, conn.send(h11.EndOfMessage()))


async def _send(stream: trio.SocketStream, limits: MirrorLimits, data: bytes | None) -> None:
    view = memoryview(data or b"")
    for i in range(0, len(view), _SEND_PART):
        with trio.move_on_after(limits.send_timeout):
            await stream.send_all(view[i:i + _SEND_PART])
            continue
        raise _Close  # a reader that does not read holds no slot


async def _simple(stream: trio.SocketStream, conn: h11.Connection, limits: MirrorLimits, status: int,
                  body: bytes, *, extra: list[tuple[str, str]] | None = None, close: bool = False) -> None:
    headers = [("Content-Length", str(len(body))), ("Content-Type", "text/plain"), *(extra or [])]
    if close:
        headers.append(("Connection", "close"))
    await _send(stream, limits, conn.send(h11.Response(status_code=status, headers=headers,
                                                        reason=HTTPStatus(status).phrase)))
    if body:
        await _send(stream, limits, conn.send(h11.Data(data=body)))
    await _send(stream, limits, conn.send(h11.EndOfMessage()))


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n"
         b"Retry-After: 1\r\nConnection: close\r\n\r\nbusy\n")


async def serve_mirror(
    root: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    stats: MirrorStats | None = None,
    *,
    limits: MirrorLimits | None = None,
    task_status: TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``root`` until cancelled; reports (host, port) through task_status."""
    root = root.resolve()  # noqa: ASYNC240 (once, at start-up)
    stats = stats if stats is not None else MirrorStats()
    lim = limits if limits is not None else MirrorLimits()
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    live = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal live
        try:
            if live >= lim.max_connections:
                stats.refused_connections += 1
                with trio.move_on_after(1.0):
                    await stream.send_all(_BUSY)
                return
            live += 1
            try:
                await _handle(stream, root, stats, lim)
            finally:
                live -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, _Close):
            pass
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started((bound[0], bound[1]))
