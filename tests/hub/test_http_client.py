"""The HTTP client's new parts against a real socket: h11-parsed heads, chunked bodies, redirects and credentials."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from autoglm.node._http import get_small, open_connection, parse_url
from autoglm.node.errors import MirrorError

Handler = Callable[[str, dict[str, str]], bytes]


async def _serve(handler: Handler, seen: list[tuple[str, dict[str, str]]], task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def conn(stream: trio.SocketStream) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            target = lines[0].split(" ")[1]
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            seen.append((target, headers))
            await stream.send_all(handler(target, headers))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, conn, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


def _chunked(parts: list[bytes]) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n" + body


async def test_chunked_body_then_keep_alive_then_content_length() -> None:
    seen: list[tuple[str, dict[str, str]]] = []

    def handler(target: str, headers: dict[str, str]) -> bytes:
        if target == "/chunked":
            return _chunked([b'{"a":', b" " * 70000, b"1}"])
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve, handler, seen)
        u = parse_url(f"http://127.0.0.1:{port}/chunked")
        conn = await open_connection(u)
        resp = await conn.request("GET", "/chunked", {})
        assert resp.status == 200 and resp.content_length is None
        body = await conn.read_all(1 << 20)
        assert body == b'{"a":' + b" " * 70000 + b"1}"
        assert conn.reusable and conn.remaining == 0
        resp = await conn.request("GET", "/plain", {})  # the same connection, after a chunked body
        assert resp.content_length == 5 and await conn.read_all(100) == b"hello"
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_chunked_body_cut_short_is_an_error() -> None:
    def handler(target: str, headers: dict[str, str]) -> bytes:
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n10\r\nshort"

    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve, handler, [])
        with pytest.raises(MirrorError):
            # The server keeps the socket open: the time limit ends it, or h11 sees the close.
            await get_small(f"http://127.0.0.1:{port}/x", {}, limit=1 << 20, time_limit=2)
        nursery.cancel_scope.cancel()


async def test_malformed_head_is_a_mirror_error() -> None:
    def handler(target: str, headers: dict[str, str]) -> bytes:
        return b"HTTP/1.1 200 OK\r\nBad Header Without Colon\r\n\r\n"

    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve, handler, [])
        with pytest.raises(MirrorError, match="not a valid HTTP"):
            await get_small(f"http://127.0.0.1:{port}/x", {}, limit=100, time_limit=5)
        nursery.cancel_scope.cancel()


async def test_redirects_relative_and_cross_origin_drop_credentials() -> None:
    seen_a: list[tuple[str, dict[str, str]]] = []
    seen_b: list[tuple[str, dict[str, str]]] = []
    ports: dict[str, int] = {}

    def a(target: str, headers: dict[str, str]) -> bytes:
        if target == "/start":  # relative: same origin, the token stays
            return b"HTTP/1.1 302 Found\r\nLocation: ../hop?x=1\r\nContent-Length: 0\r\n\r\n"
        if target == "/hop?x=1":  # another host name: the token must not follow
            return b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://localhost:%d/file\r\nContent-Length: 0\r\n\r\n" % ports["b"]
        if target == "/loop":
            return b"HTTP/1.1 301 Moved\r\nLocation: /loop\r\nContent-Length: 0\r\n\r\n"
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    def b(target: str, headers: dict[str, str]) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndata"

    async with trio.open_nursery() as nursery:
        ports["a"] = await nursery.start(_serve, a, seen_a)
        ports["b"] = await nursery.start(_serve, b, seen_b)
        hdrs = {"Authorization": "Bearer tok", "Cookie": "c=1", "User-Agent": "t"}
        resp, body, final = await get_small(f"http://127.0.0.1:{ports['a']}/start", hdrs, limit=100, time_limit=5)
        assert (resp.status, body, final.host) == (200, b"data", "localhost")
        assert [t for t, _ in seen_a] == ["/start", "/hop?x=1"]
        assert all(h.get("authorization") == "Bearer tok" for _, h in seen_a)
        assert seen_b and all("authorization" not in h and "cookie" not in h for _, h in seen_b)
        assert seen_b[0][1]["user-agent"] == "t"
        with pytest.raises(MirrorError, match="redirects"):
            await get_small(f"http://127.0.0.1:{ports['a']}/loop", {}, limit=100, time_limit=5)
        nursery.cancel_scope.cancel()
