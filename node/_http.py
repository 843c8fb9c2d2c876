"""A lean HTTP/1.1 client on trio sockets, for mirrors and hub APIs: GET with Range, keep-alive, proxies, redirects.

Strategy: model bytes move at disk speed, so the body path avoids copies. The
response head (64 KiB cap) is cut at its blank line and handed to h11, which
parses and validates it; a Content-Length body is then read with ``recv_into``
straight into the caller's buffer, which the caller pwrites and hashes, with
no h11 in the way. Chunked bodies (API answers, proxies, small files) go
through h11's decoder: a copy per chunk, which only small bodies pay.

Redirects (the Hub answers ``resolve`` with 302 to a CDN, sometimes with a
relative ``Location``) are resolved by :func:`redirect_location`; the caller
re-sends with :func:`redirect_headers`, which drops ``Authorization`` (and
cookies) when the new URL is on another origin, so a token never reaches a CDN.

Proxies follow the usual environment variables (``http_proxy``,
``https_proxy``, ``no_proxy`` via :func:`urllib.request.getproxies`): plain
HTTP goes through the proxy in absolute form, HTTPS through ``CONNECT``.
"""

from __future__ import annotations

import base64
import socket
import ssl
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import h11
import trio

from autoglm.node._lowat import LowWater
from autoglm.node.errors import MirrorError

__all__ = [
    "HttpConnection",
    "PermanentMirrorError",
    "Response",
    "Url",
    "get_small",
    "open_connection",
    "parse_url",
    "redirect_headers",
    "redirect_location",
    "request_target",
]

MAX_HEAD = 64 * 1024
REDIRECTS = frozenset((301, 302, 303, 307, 308))
MAX_REDIRECTS = 5
_CREDENTIAL_HEADERS = frozenset(("authorization", "cookie", "proxy-authorization"))


class PermanentMirrorError(MirrorError):
    """Retrying will not help (unknown host, file not there, wrong file): stop asking this mirror.

    ``whole_source`` means the mirror as a whole is unusable, not just one file.
    """

    whole_source = False


class HostNotFound(PermanentMirrorError):
    whole_source = True


class CertificateRefused(PermanentMirrorError):
    whole_source = True


@dataclass(frozen=True, slots=True)
class Url:
    scheme: str
    host: str
    port: int
    path: str  # path + query, already quoted
    userinfo: str = ""

    @property
    def origin(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")

    def __str__(self) -> str:
        return self.origin + self.path


def parse_url(text: str) -> Url:
    u = urllib.parse.urlsplit(text)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise MirrorError(f"not an http(s) URL: {text!r}")
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError as exc:
        raise MirrorError(f"bad port in URL {text!r}") from exc
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    userinfo = u.netloc.rpartition("@")[0] if "@" in u.netloc else ""
    return Url(u.scheme, u.hostname, port, path, urllib.parse.unquote(userinfo))


@dataclass(slots=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; repeated headers joined by ", "
    content_length: int | None = None
    keep_alive: bool = True


def _proxy_for(url: Url) -> Url | None:
    proxies = urllib.request.getproxies()
    if proxies.get("no") and urllib.request.proxy_bypass(url.host):
        return None
    spec = proxies.get(url.scheme)
    if not spec:
        return None
    if "://" not in spec:
        spec = "http://" + spec
    return parse_url(spec)


class HttpConnection:
    """One HTTP/1.1 connection. ``request`` sends and reads the head; ``read_into`` reads the body."""

    def __init__(self, sock: trio.socket.SocketType | None, tls: trio.SSLStream | None, url: Url, via_proxy: bool) -> None:
        self._sock = sock
        self._tls = tls
        self.url = url
        self.via_proxy = via_proxy
        self._buf = bytearray(MAX_HEAD)
        self._pending = memoryview(b"")  # body bytes that arrived with the head
        self.remaining: int | None = 0
        self.reusable = False
        self.proxy_headers: dict[str, str] = {}
        self.head_bytes = 0  # response bytes seen for the current request
        self._chunked: h11.Connection | None = None  # the current body is chunked: h11 decodes it
        self._leftover = memoryview(b"")  # decoded chunk bytes not yet handed out
        self._lowat = LowWater()

    async def _recv_into(self, view: memoryview, expect: int | None = None) -> int:
        """Bytes into ``view``. ``expect``: body bytes still owed (raises the low-water mark, _lowat.py)."""
        if self._sock is not None:
            try:
                if expect is None:
                    return await self._sock.recv_into(view)
                return await self._lowat.recv_into(self._sock, view, expect)
            except OSError as exc:
                raise MirrorError(f"{self.url.origin}: connection failed: {exc.strerror or exc}") from exc
        assert self._tls is not None
        try:
            data = await self._tls.receive_some(len(view))
        except trio.BrokenResourceError as exc:
            raise MirrorError(f"{self.url.origin}: connection broken: {exc.__cause__ or exc}") from exc
        view[: len(data)] = data
        return len(data)

    async def _send_all(self, data: bytes) -> None:
        try:
            if self._sock is not None:
                view = memoryview(data)
                while view:
                    n = await self._sock.send(view)
                    view = view[n:]
            else:
                assert self._tls is not None
                await self._tls.send_all(data)
        except (OSError, trio.BrokenResourceError) as exc:
            raise MirrorError(f"{self.url.origin}: connection broken while sending: {exc}") from exc

    async def request(self, method: str, target: str, headers: dict[str, str]) -> Response:
        """Send a request (no body) and read the response head."""
        if self.remaining != 0 or self._pending or self._chunked is not None:
            # The previous body was not read to its end (a cancelled or abandoned request):
            # its remaining bytes would be parsed as this response. Never reuse such a connection.
            self.reusable = False
            raise MirrorError(f"{self.url.origin}: connection reused with a previous response body unread")
        self.reusable = False
        self.head_bytes = 0
        host = headers.pop("Host", None) or self.url.origin.split("://", 1)[1]
        fields = [("Host", host), *{**self.proxy_headers, **headers}.items()]
        h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        try:
            data = h.send(h11.Request(method=method, target=target, headers=fields)) or b""
            h.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise MirrorError(f"{self.url.origin}: cannot send this request: {exc}") from exc
        await self._send_all(data)
        return await self._read_head(h, method)

    async def _read_head(self, h: h11.Connection, method: str) -> Response:
        buf = self._buf
        filled = 0
        while True:
            end = buf.find(b"\r\n\r\n", 0, filled)
            if end < 0:
                if filled == len(buf):
                    raise MirrorError(f"{self.url.origin}: response head over {MAX_HEAD} bytes")
                n = await self._recv_into(memoryview(buf)[filled:])
                self.head_bytes += n
                if n == 0:
                    raise MirrorError(f"{self.url.origin}: connection closed before a response" if filled == 0 else f"{self.url.origin}: truncated response head")
                filled += n
                continue
            try:
                h.receive_data(bytes(buf[: end + 4]))
                ev = h.next_event()
            except h11.RemoteProtocolError as exc:
                first = bytes(buf[: min(end, 80)]).split(b"\r\n", 1)[0]
                raise MirrorError(f"{self.url.origin}: not a valid HTTP/1.x response ({exc}): {first!r}") from exc
            rest = bytes(buf[end + 4 : filled])
            if isinstance(ev, h11.InformationalResponse):  # 100 Continue and friends: the real head follows
                buf[: len(rest)] = rest
                filled = len(rest)
                continue
            assert isinstance(ev, h11.Response)
            self._pending = memoryview(rest)
            return self._frame(h, ev, method)

    def _frame(self, h: h11.Connection, ev: h11.Response, method: str) -> Response:
        """The body's framing: none, Content-Length (zero-copy path), chunked (h11) or until close."""
        resp = Response(ev.status_code, ev.reason.decode("latin-1"))
        for k, v in ev.headers:
            name, value = k.decode("latin-1"), v.decode("latin-1")
            resp.headers[name] = f"{resp.headers[name]}, {value}" if name in resp.headers else value
        conn = resp.headers.get("connection", "").lower()
        resp.keep_alive = ev.http_version == b"1.1" and "close" not in conn
        if method in ("HEAD", "CONNECT") or resp.status in (204, 304):
            self.remaining = 0
        elif "chunked" in resp.headers.get("transfer-encoding", "").lower():
            self._chunked = h
            self.remaining = None
        elif "content-length" in resp.headers:
            try:
                resp.content_length = int(resp.headers["content-length"])
            except ValueError as exc:
                raise MirrorError(f"{self.url.origin}: bad Content-Length") from exc
            self.remaining = resp.content_length
        else:
            resp.keep_alive = False
            self.remaining = None  # until the server closes
        self.reusable = resp.keep_alive
        return resp

    async def _read_chunked(self, view: memoryview) -> int:
        h = self._chunked
        assert h is not None
        while not self._leftover:
            try:
                ev = h.next_event()
            except h11.RemoteProtocolError as exc:
                self._chunked = None
                self.reusable = False
                raise MirrorError(f"{self.url.origin}: bad chunked body: {exc}") from exc
            if ev is h11.NEED_DATA:
                if self._pending:
                    data, self._pending = bytes(self._pending), memoryview(b"")
                else:
                    scratch = bytearray(1 << 16)
                    n = await self._recv_into(memoryview(scratch))
                    data = bytes(scratch[:n])
                h.receive_data(data)  # b"" is EOF: h11 then raises on a body cut short
            elif isinstance(ev, h11.Data):
                self._leftover = memoryview(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                self._chunked = None
                self.remaining = 0
                trailing, _ = h.trailing_data
                self._pending = memoryview(trailing)
                if trailing:
                    self.reusable = False  # pipelined bytes we never asked for
                return 0
        n = min(len(view), len(self._leftover))
        view[:n] = self._leftover[:n]
        self._leftover = self._leftover[n:]
        return n

    async def read_into(self, view: memoryview) -> int:
        """Read body bytes into ``view``; 0 at the end of the body. Raises MirrorError on truncation."""
        if self._chunked is not None:
            return await self._read_chunked(view)
        if self.remaining == 0:
            return 0
        want = len(view) if self.remaining is None else min(len(view), self.remaining)
        if self._pending:
            n = min(want, len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
        else:
            n = await self._recv_into(view[:want], self.remaining or 0)
        if n == 0:
            if self.remaining is None:
                self.remaining = 0
                self.reusable = False
                return 0
            raise MirrorError(f"{self.url.origin}: body truncated ({self.remaining} bytes missing)")
        if self.remaining is not None:
            self.remaining -= n
            if self.remaining == 0 and self._sock is not None:
                self._lowat.done(self._sock)
        return n

    async def read_all(self, limit: int) -> bytes:
        out = bytearray()
        buf = memoryview(bytearray(1 << 16))
        while True:
            n = await self.read_into(buf)
            if not n:
                return bytes(out)
            out += buf[:n]
            if len(out) > limit:
                raise MirrorError(f"{self.url}: response over {limit} bytes")

    async def aclose(self) -> None:
        self.reusable = False
        if self._sock is not None:
            self._sock.close()
        elif self._tls is not None:
            await trio.aclose_forcefully(self._tls)


async def _connect_tcp(host: str, port: int) -> trio.socket.SocketType:
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise HostNotFound(f"cannot resolve host {host!r} ({exc.strerror}); check the URL") from exc
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = trio.socket.socket(family, type_, proto)
        try:
            await sock.connect(addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # No SO_RCVBUF: receive autotuning (bounded by net.ipv4.tcp_rmem) sizes the window to the
        # path. A fixed buffer locks the window: 1 MiB capped one connection at about 1 MiB per
        # RTT, 5 MB/s at 200 ms (docs/benchmarks.md, the bulk channel over a long link).
        return sock
    raise MirrorError(f"cannot connect to {host}:{port}: {last.strerror if last else 'no address'}") from last


async def open_connection(url: Url, ssl_context: ssl.SSLContext | None = None) -> HttpConnection:
    """Connect to ``url``'s origin, through the environment's proxy when one applies."""
    proxy = _proxy_for(url)
    if proxy is None:
        sock = await _connect_tcp(url.host, url.port)
        if url.scheme == "http":
            return HttpConnection(sock, None, url, False)
        return HttpConnection(None, await _tls(sock, url, ssl_context), url, False)
    sock = await _connect_tcp(proxy.host, proxy.port)
    auth = {}
    if proxy.userinfo:
        auth["Proxy-Authorization"] = "Basic " + base64.b64encode(proxy.userinfo.encode()).decode()
    if url.scheme == "http":
        conn = HttpConnection(sock, None, url, True)
        conn.proxy_headers = auth
        return conn
    tunnel = HttpConnection(sock, None, proxy, False)
    resp = await tunnel.request("CONNECT", f"{url.host}:{url.port}", {**auth, "Host": f"{url.host}:{url.port}"})
    if resp.status != 200:
        sock.close()
        raise MirrorError(f"proxy {proxy.origin} refused CONNECT to {url.host}:{url.port}: {resp.status} {resp.reason}")
    return HttpConnection(None, await _tls(sock, url, ssl_context), url, False)


async def _tls(sock: trio.socket.SocketType, url: Url, ctx: ssl.SSLContext | None) -> trio.SSLStream:
    stream = trio.SSLStream(trio.SocketStream(sock), ctx or ssl.create_default_context(), server_hostname=url.host)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
            raise CertificateRefused(
                f"TLS certificate of {url.origin} refused: {exc.__cause__.verify_message}; "
                "add its CA with SSL_CERT_FILE if you trust it"
            ) from exc
        raise MirrorError(f"TLS handshake with {url.origin} failed: {exc.__cause__ or exc}") from exc
    return stream


def request_target(conn: HttpConnection, url: Url) -> str:
    """Origin-form normally, absolute-form through a plain HTTP proxy."""
    return str(url) if conn.via_proxy else url.path


def redirect_location(url: Url, resp: Response) -> Url | None:
    """The URL a 3xx response sends us to (relative ``Location`` resolved), or None for other statuses."""
    if resp.status not in REDIRECTS:
        return None
    loc = resp.headers.get("location", "").strip()
    if not loc:
        raise MirrorError(f"{url}: {resp.status} redirect without a Location header")
    target = parse_url(urllib.parse.urljoin(str(url), loc))
    if url.scheme == "https" and target.scheme == "http":
        raise PermanentMirrorError(f"{url}: refusing a redirect from https to plain http ({target.origin})")
    return target


def redirect_headers(headers: dict[str, str], old: Url, new: Url) -> dict[str, str]:
    """The headers to send after a redirect: credentials stay with their origin."""
    if new.origin == old.origin:
        return dict(headers)
    return {k: v for k, v in headers.items() if k.lower() not in _CREDENTIAL_HEADERS}


async def get_small(
    url: str | Url,
    headers: dict[str, str],
    *,
    limit: int,
    time_limit: float,
    method: str = "GET",
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[Response, bytes, Url]:
    """One small request (an API answer), following redirects; returns the last head, its body and URL.

    The body is capped at ``limit`` bytes whatever the server claims; any
    status is returned, the caller judges it. Each hop gets a fresh connection.
    """
    u = url if isinstance(url, Url) else parse_url(url)
    hdrs = dict(headers)
    try:
        with trio.fail_after(time_limit):
            for _ in range(MAX_REDIRECTS + 1):
                conn = await open_connection(u, ssl_context)
                try:
                    resp = await conn.request(method, request_target(conn, u), dict(hdrs))
                    if resp.content_length is not None and resp.content_length > limit:
                        raise MirrorError(f"{u}: response of {resp.content_length} bytes, over the {limit}-byte limit")
                    target = redirect_location(u, resp)
                    body = b"" if target is not None else await conn.read_all(limit)
                finally:
                    await conn.aclose()
                if target is None:
                    return resp, body, u
                hdrs = redirect_headers(hdrs, u, target)
                u = target
    except trio.TooSlowError as exc:
        raise MirrorError(f"{u}: no complete answer within {time_limit:.0f}s") from exc
    raise MirrorError(f"{url}: more than {MAX_REDIRECTS} redirects")
