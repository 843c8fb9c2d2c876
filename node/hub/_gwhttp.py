"""The gateway's HTTP/1.1 server and its per-client budgets (h11 on trio; the routes are ``_gateway``'s).

Budgets per client: at most ``max_clients`` connections (more get 503), a
request head within ``header_timeout`` (16 KiB at most), ``idle_timeout``
between requests, ``send_timeout`` without progress while sending; request
bodies are refused (413), keep-alive otherwise. A handler answers through a
:class:`Reply`, which knows whether the request was a HEAD (no body sent) and
adds the headers every answer carries.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
import trio

__all__ = ["Abort", "ClientBudgets", "ClientStats", "FileSpan", "HttpServer", "Reply", "close_gracefully"]

log = logging.getLogger("autoglm.node.hub._gateway")

_MAX_HEADER = 16 * 1024


class Abort(Exception):
    """The client's response cannot be completed: close its connection."""


@dataclass(frozen=True, slots=True)
class ClientBudgets:
    max_clients: int = 64
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    send_timeout: float = 60.0


@dataclass(slots=True)
class ClientStats:
    clients: int = 0
    requests: int = 0
    refused_clients: int = 0


class Reply:
    """The answer to one request on one connection."""

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection, head_only: bool, send_timeout: float,
                 always: Sequence[tuple[str, str]]) -> None:
        self.stream = stream
        self.conn = conn
        self.head_only = head_only
        self._send_timeout = send_timeout
        self._always = list(always)

    @property
    def started(self) -> bool:
        """The status line is out: an error can no longer be answered, only the connection cut."""
        return self.conn.our_state is not h11.SEND_RESPONSE

    async def _send(self, data: bytes | None) -> None:
        if not data:
            return
        with trio.move_on_after(self._send_timeout) as scope:
            await self.stream.send_all(data)
        if scope.cancelled_caught:
            raise Abort("client too slow")

    async def head(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        await self._send(self.conn.send(h11.Response(status_code=status, headers=[*headers, *self._always],
                                                     reason=HTTPStatus(status).phrase)))

    async def data(self, data: bytes) -> None:
        if not self.head_only:
            await self._send(self.conn.send(h11.Data(data=data)))

    async def file(self, fd: int, offset: int, count: int) -> None:
        """``count`` body bytes of the file ``fd`` from ``offset``, sent by the kernel (``os.sendfile``).

        No copy through Python and no worker thread: h11 passes the span through
        (``send_with_data_passthrough``) and counts it against the Content-Length.
        The file must hold the bytes (a short file ends the connection).

        Strategy: each ``sendfile`` call runs in the event loop and sends at most
        what the socket buffer takes, so bytes not in the page cache are read
        from disk there, one socket buffer at a time (nginx's ``sendfile`` without
        aio does the same); a worker thread per call would cost more than it
        saves for bytes that were just written.
        """
        if self.head_only or not count:
            return
        span = FileSpan(fd, offset, count)
        parts: list[object] = list(self.conn.send_with_data_passthrough(h11.Data(data=span)) or [])  # type: ignore[arg-type]
        for part in parts:
            if part is span:
                await self._sendfile(span)
            else:
                await self._send(bytes(part))  # type: ignore[call-overload]

    async def _sendfile(self, span: FileSpan) -> None:
        sock = self.stream.socket
        out = sock.fileno()
        offset, left = span.offset, span.count
        while left:
            try:
                n = os.sendfile(out, span.fd, offset, left)
            except BlockingIOError:
                with trio.move_on_after(self._send_timeout) as scope:
                    await trio.lowlevel.wait_writable(out)
                if scope.cancelled_caught:
                    raise Abort("client too slow") from None
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"sending to the client: {exc}") from exc
            if n == 0:
                raise Abort("the file is shorter than its recorded bytes")
            offset += n
            left -= n
            await trio.lowlevel.checkpoint()  # the other clients' turn between socket-buffer-fulls

    async def end(self) -> None:
        await self._send(self.conn.send(h11.EndOfMessage()))

    async def answer(self, status: int, value: Any, extra: Sequence[tuple[str, str]] = ()) -> None:
        """A whole JSON answer."""
        body = json.dumps(value).encode()
        await self.head(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *extra])
        await self.data(body)
        await self.end()


class FileSpan:
    """Body bytes that stay in a file until the kernel sends them (h11 only needs their length)."""

    __slots__ = ("count", "fd", "offset")

    def __init__(self, fd: int, offset: int, count: int) -> None:
        self.fd, self.offset, self.count = fd, offset, count

    def __len__(self) -> int:
        return self.count


Handler = Callable[[Reply, str, str, dict[str, str]], Awaitable[None]]


class HttpServer:
    """Serves connections with ``handler(reply, method, target, headers)`` within the budgets."""

    def __init__(self, handler: Handler, budgets: ClientBudgets, stats: ClientStats,
                 always: Sequence[tuple[str, str]] = ()) -> None:
        self.handler = handler
        self.budgets = budgets
        self.stats = stats
        self.always = tuple(always)

    async def client(self, stream: trio.SocketStream) -> None:
        """One client connection (``trio.serve_listeners`` calls this)."""
        try:
            if self.stats.clients >= self.budgets.max_clients:
                self.stats.refused_clients += 1
                with trio.move_on_after(2):
                    await stream.send_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 5\r\n"
                                          b"Connection: close\r\n\r\n")
                return
            self.stats.clients += 1
            try:
                await self._connection(stream)
            finally:
                self.stats.clients -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, Abort):
            pass
        except Exception:  # one client's failure must not stop the gateway
            log.exception("gateway: a client's request failed")
        finally:
            await close_gracefully(stream)

    async def _next_request(self, stream: trio.SocketStream, conn: h11.Connection) -> Any:
        """The next h11 event after waiting for data within the idle and header budgets (None: give up)."""
        deadline: float | None = None
        while True:
            ev = conn.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            wait = self.budgets.idle_timeout if deadline is None else deadline - trio.current_time()
            with trio.move_on_after(max(wait, 0.0)) as scope:
                data = await stream.receive_some(65536)
            if scope.cancelled_caught:
                return None
            if deadline is None:
                deadline = trio.current_time() + self.budgets.header_timeout
            conn.receive_data(data)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER)
        while True:
            ev = await self._next_request(stream, conn)
            if not isinstance(ev, h11.Request):
                return  # idle, ConnectionClosed, or PAUSED after a response we could not finish
            self.stats.requests += 1
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in ev.headers}
            reply = Reply(stream, conn, ev.method == b"HEAD", self.budgets.send_timeout, self.always)
            if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
                await reply.answer(413, {"error": "request bodies are not accepted"}, [("Connection", "close")])
                return
            while not isinstance(conn.next_event(), h11.EndOfMessage):
                pass
            await self.handler(reply, ev.method.decode("latin-1"), ev.target.decode("latin-1"), headers)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()


async def close_gracefully(stream: trio.SocketStream) -> None:
    """Close after what was sent is delivered: half-close, drain what the client still sends (briefly), close.

    Closing with unread bytes in the socket would reset the connection, and the
    client could lose the answer (a 503 or 413) we just sent.
    """
    with trio.move_on_after(1.0):
        try:
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)
