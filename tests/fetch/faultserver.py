"""A small real HTTP/1.1 static server on 127.0.0.1 that injects faults on demand.

Supports GET/HEAD, single ``Range: bytes=a-b``, strong ETags and ``If-Range``,
keep-alive. Faults are rules consumed in order: each applies to the next
``count`` matching requests. Kinds:

``429`` / ``503`` (with ``Retry-After: retry_after``), ``502``, ``504``,
``reset`` (RST after ``after`` body bytes), ``truncate`` (close after ``after``
body bytes though Content-Length promised more), ``trickle`` (``chunk`` bytes
every ``interval`` s), ``stall`` (head, then silence), ``norange`` (200 with the
whole body), ``change`` (from now on the file has other bytes and a new ETag),
``wrong`` (one byte of the body flipped), ``html`` (a 200 text/html page), ``404``;
``drop`` (close without answering; with ``only_reused`` it is a server closing an
idle keep-alive connection); ``norange+wrong`` combines two.

``stats`` counts requests and body bytes actually sent, per path.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import trio


@dataclass
class Fault:
    kind: str
    count: int = 1
    path: str | None = None  # only requests for this path (manifest-relative)
    after: int = 0
    retry_after: int = 1
    chunk: int = 1024
    interval: float = 0.01
    only_range: bool = False  # only requests carrying a Range header
    only_reused: bool = False  # only the 2nd+ request of a kept-alive connection


@dataclass
class Stats:
    requests: int = 0
    body_bytes: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    log: list[tuple[str, int, str | None]] = field(default_factory=list)  # (path, status, range)
    proxied: int = 0  # requests in absolute form (we were used as an HTTP proxy)
    headers: list[dict[str, str]] = field(default_factory=list)


class FaultServer:
    def __init__(self, root: Path, prefix: str = "/") -> None:
        self.root = root
        self.prefix = prefix
        self.faults: list[Fault] = []
        self.stats = Stats()
        self.changed: dict[str, bytes] = {}
        self.port = 0
        self.on_request: Callable[[str], None] | None = None
        self.delay = 0.0
        self.ssl_context: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}{self.prefix}"

    def add(self, kind: str, **kw: object) -> Fault:
        f = Fault(kind, **kw)  # type: ignore[arg-type]
        self.faults.append(f)
        return f

    def _fault_for(self, rel: str, has_range: bool, reused: bool) -> Fault | None:
        for f in self.faults:
            if f.count > 0 and (f.path is None or f.path == rel) and (not f.only_range or has_range) and (not f.only_reused or reused):
                f.count -= 1
                return f
        return None

    async def serve(self, *, task_status: trio.TaskStatus[FaultServer] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        handler = self._handle if self.ssl_context is None else self._handle_tls
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handler, listeners)
            task_status.started(self)

    async def _handle_tls(self, stream: trio.SocketStream) -> None:
        assert self.ssl_context is not None
        tls = trio.SSLStream(stream, self.ssl_context, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            return
        await self._handle(tls)  # type: ignore[arg-type]

    async def _handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        served = 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for ln in lines[1:]:
                    k, _, v = ln.partition(":")
                    headers[k.strip().lower()] = v.strip()
                keep = await self._respond(stream, method, target, headers, served > 0)
                served += 1
                if not keep:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    def _body_of(self, rel: str) -> bytes | None:
        if rel in self.changed:
            return self.changed[rel]
        p = (self.root / rel).resolve()
        if not p.is_relative_to(self.root.resolve()) or not p.is_file():
            return None
        return p.read_bytes()

    async def _send_simple(self, stream: trio.SocketStream, status: str, extra: str = "", body: bytes = b"", ctype: str = "text/plain") -> None:
        await stream.send_all(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
        )

    async def _respond(self, stream: trio.SocketStream, method: str, target: str, headers: dict[str, str], reused: bool = False) -> bool:
        self.stats.requests += 1
        self.stats.headers.append(headers)
        if target.startswith("http://"):
            self.stats.proxied += 1
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        path = unquote(target.split("?", 1)[0])
        rel = path[len(self.prefix):] if path.startswith(self.prefix) else path.lstrip("/")
        rng = headers.get("range")
        fault = self._fault_for(rel, rng is not None, reused)
        kind = fault.kind if fault else None
        if kind == "drop":  # an idle keep-alive connection the server closed: no answer at all
            return False
        if self.on_request is not None:
            self.on_request(rel)
        if self.delay:
            await trio.sleep(self.delay)  # a far-away mirror: every answer comes late
        if kind == "html":
            page = b"<!doctype html><html><body>Welcome to nginx!</body></html>"
            self.stats.log.append((rel, 200, rng))
            await self._send_simple(stream, "200 OK", body=page, ctype="text/html")
            return True
        if kind in ("429", "503"):
            self.stats.log.append((rel, int(kind), rng))
            await self._send_simple(stream, f"{kind} Busy", f"Retry-After: {fault.retry_after}\r\n", b"busy")  # type: ignore[union-attr]
            return True
        if kind in ("502", "504", "404"):
            self.stats.log.append((rel, int(kind), rng))
            await self._send_simple(stream, f"{kind} Fault", body=b"fault")
            return True
        body = self._body_of(rel)
        if body is None:
            self.stats.log.append((rel, 404, rng))
            await self._send_simple(stream, "404 Not Found", body=b"not found")
            return True
        if kind == "change":
            body = bytes(b ^ 0x5A for b in body)
            self.changed[rel] = body
        etag = self._etag(rel, body)
        start, end, status = 0, len(body), "200 OK"
        kinds = set((kind or "").split("+"))  # "norange+wrong": both at once
        if rng and "norange" not in kinds and (headers.get("if-range") in (None, etag)):
            spec = rng.removeprefix("bytes=")
            a, _, b = spec.partition("-")
            if a == "":
                start, end = len(body) - int(b), len(body)
            else:
                start, end = int(a), (int(b) + 1 if b else len(body))
            end = min(end, len(body))
            if start >= len(body) or start >= end:
                await self._send_simple(stream, "416 Range Not Satisfiable", f"Content-Range: bytes */{len(body)}\r\n")
                return True
            status = "206 Partial Content"
        payload = body[start:end]
        if "wrong" in kinds and payload:
            i = len(payload) // 2
            payload = payload[:i] + bytes([payload[i] ^ 0xFF]) + payload[i + 1:]
        hdr = f"HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {len(payload)}\r\nETag: {etag}\r\nAccept-Ranges: bytes\r\n"
        if status.startswith("206"):
            hdr += f"Content-Range: bytes {start}-{end - 1}/{len(body)}\r\n"
        hdr += self._extra_headers(target, rel)
        await stream.send_all((hdr + "\r\n").encode())
        self.stats.log.append((rel, int(status[:3]), rng))
        if method == "HEAD":
            return True
        if kind in ("reset", "truncate"):
            part = payload[: fault.after]  # type: ignore[union-attr]
            await self._send_body(stream, rel, part)
            if kind == "reset" and isinstance(stream, trio.SocketStream):
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if kind == "stall":
            await trio.sleep_forever()
        if kind == "trickle":
            assert fault is not None
            for i in range(0, len(payload), fault.chunk):
                await self._send_body(stream, rel, payload[i : i + fault.chunk])
                await trio.sleep(fault.interval)
            return True
        await self._send_body(stream, rel, payload)
        return True

    def _etag(self, rel: str, body: bytes) -> str:
        return f'"{hash(body) & 0xFFFFFFFF:08x}-{len(body)}"'

    def _extra_headers(self, target: str, rel: str) -> str:
        """More response header lines ("Name: value\r\n" each) for a file answer (subclasses)."""
        return ""

    async def _send_body(self, stream: trio.SocketStream, rel: str, data: bytes) -> None:
        view = memoryview(data)
        step = 256 << 10
        for i in range(0, len(view), step):
            part = view[i : i + step]
            await stream.send_all(part)
            self.stats.body_bytes += len(part)
            self.stats.by_path[rel] = self.stats.by_path.get(rel, 0) + len(part)
