"""The static mirror served over real 127.0.0.1 sockets."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.node._mirror_server import MirrorLimits, MirrorStats, serve_mirror


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "a b.txt").write_bytes(b"hello")
    return tmp_path


async def _with_server(site: Path, fn):  # type: ignore[no-untyped-def]
    stats = MirrorStats()
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_mirror, site, "127.0.0.1", 0, stats)
        assert host == "127.0.0.1"
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", trust_env=False) as client:
            with trio.fail_after(10):
                await fn(client)
        nursery.cancel_scope.cancel()
    return stats


async def test_get_range_and_stats(site: Path) -> None:
    body = (site / "sub" / "w.bin").read_bytes()

    async def check(c: httpx.AsyncClient) -> None:
        r = await c.get("/sub/w.bin")
        assert r.status_code == 200 and r.content == body
        r = await c.get("/sub/w.bin", headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == body[10:20]
        assert r.headers["content-range"] == f"bytes 10-19/{len(body)}"
        r = await c.get("/sub/w.bin", headers={"Range": "bytes=-5"})
        assert r.content == body[-5:]
        r = await c.get("/a%20b.txt")
        assert r.content == b"hello"

    stats = await _with_server(site, check)
    assert stats.requests == 4
    assert stats.body_bytes == len(body) + 10 + 5 + 5


async def test_if_range_mismatch_gives_whole_file(site: Path) -> None:
    async def check(c: httpx.AsyncClient) -> None:
        r = await c.get("/a%20b.txt", headers={"Range": "bytes=0-1", "If-Range": '"stale"'})
        assert r.status_code == 200 and r.content == b"hello"
        etag = r.headers["etag"]
        r = await c.get("/a%20b.txt", headers={"Range": "bytes=0-1", "If-Range": etag})
        assert r.status_code == 206 and r.content == b"he"

    await _with_server(site, check)


@pytest.mark.parametrize("target", ["/../etc/passwd", "/sub/../../x", "/%2e%2e/x", "/sub", "/missing"])
async def test_refuses_traversal_and_missing(site: Path, target: str) -> None:
    async def check(c: httpx.AsyncClient) -> None:
        r = await c.get(target)
        assert r.status_code == 404

    await _with_server(site, check)


async def test_unsatisfiable_range(site: Path) -> None:
    async def check(c: httpx.AsyncClient) -> None:
        r = await c.get("/a%20b.txt", headers={"Range": "bytes=100-"})
        assert r.status_code == 416
        assert r.headers["content-range"] == "bytes */5"

    await _with_server(site, check)


# --- hostile clients: the mirror behaves like a web server -------------------------------


async def _raw(port: int, request: bytes, *, read_for: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server sends before closing (or `read_for` s)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = bytearray()
    async with stream:
        with trio.move_on_after(read_for):
            try:
                await stream.send_all(request)
                while chunk := await stream.receive_some(65536):
                    out += chunk
            except trio.BrokenResourceError:  # a refused connection may be reset
                pass
    return bytes(out)


async def _with_port(site: Path, fn, limits: MirrorLimits | None = None):  # type: ignore[no-untyped-def]
    stats = MirrorStats()
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(
            functools.partial(serve_mirror, site, "127.0.0.1", 0, stats, limits=limits or MirrorLimits()))
        with trio.fail_after(20):
            await fn(port)
        nursery.cancel_scope.cancel()
    return stats


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


@pytest.mark.parametrize(("extra", "status"), [
    (b"Content-Length: 10\r\n", 413),
    (b"Transfer-Encoding: chunked\r\n", 413),
])
async def test_request_body_refused_and_connection_closed(site: Path, extra: bytes, status: int) -> None:
    async def check(port: int) -> None:
        with trio.fail_after(5):
            raw = await _raw(port, b"GET /a%20b.txt HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
        assert _status(raw) == status
        assert b"connection: close" in raw.lower()

    await _with_port(site, check)


def test_stuck_body_does_not_spin_or_block_others(site: Path, cli_cmd: list[str]) -> None:
    """A request whose declared body never comes costs the server no CPU and nobody else waits."""
    proc = subprocess.Popen([*cli_cmd, "serve-mirror", str(site)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        port = int(url.rsplit(":", 1)[1].strip("/"))
        stuck = socket.create_connection(("127.0.0.1", port))
        stuck.sendall(b"GET /a%20b.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        cpu0 = _cpu_seconds(proc.pid)
        t0 = time.monotonic()
        with httpx.Client(trust_env=False, timeout=5) as client:
            r = client.get(url + "sub/w.bin")
        assert r.status_code == 200
        time.sleep(1.0)
        spent = _cpu_seconds(proc.pid) - cpu0
        wall = time.monotonic() - t0
        # A busy loop burns ~1 CPU-second per second; an idle server a few ms.
        assert spent < 0.25 * wall, (spent, wall)
        stuck.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # a spinning server never reaches its signal handler
            proc.kill()
            proc.wait(10)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_slowloris_header_timeout(site: Path) -> None:
    """Clients that trickle headers are closed after header_timeout; others are served meanwhile."""
    limits = MirrorLimits(header_timeout=1.0, idle_timeout=1.0)

    async def check(port: int) -> None:
        slow = []
        for _ in range(20):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(b"GET /a%20b.txt HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)

        async def trickle(s: trio.SocketStream) -> float:
            t0 = trio.current_time()
            try:
                while True:  # one header byte every 0.2 s: every read makes progress
                    await s.send_all(b"X")
                    await trio.sleep(0.2)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            return trio.current_time() - t0

        took: list[float] = []

        async def run(s: trio.SocketStream) -> None:
            took.append(await trickle(s))

        async with trio.open_nursery() as nursery:
            for s in slow:
                nursery.start_soon(run, s)
            async with httpx.AsyncClient(trust_env=False) as client:
                with trio.fail_after(0.9):
                    r = await client.get(f"http://127.0.0.1:{port}/a%20b.txt")
            assert r.content == b"hello"
        assert len(took) == 20 and max(took) < 4.0, took
        for s in slow:
            await s.aclose()

    await _with_port(site, check, limits)


async def test_idle_keepalive_closed(site: Path) -> None:
    limits = MirrorLimits(idle_timeout=0.5)

    async def check(port: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /a%20b.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while not got.endswith(b"hello"):
                got += await stream.receive_some(65536)
            t0 = trio.current_time()
            with trio.fail_after(3):
                assert await stream.receive_some(10) == b""  # the server closed an idle connection
            assert trio.current_time() - t0 >= 0.4

    await _with_port(site, check, limits)


async def test_connection_cap(site: Path) -> None:
    limits = MirrorLimits(max_connections=4, header_timeout=30.0)

    async def check(port: int) -> None:
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
        for s in held:
            await s.send_all(b"GET /a")  # half a request line each: connections held open
        await trio.sleep(0.2)
        with trio.fail_after(3):
            raw = await _raw(port, b"GET /a%20b.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(raw) == 503
        for s in held:
            await s.aclose()
        with trio.fail_after(3):
            while True:  # the server notices the closes; a slot frees up
                raw = await _raw(port, b"GET /a%20b.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if _status(raw) == 200:
                    break
                await trio.sleep(0.05)
        assert raw.endswith(b"hello")

    await _with_port(site, check, limits)


@pytest.mark.parametrize("target", ["/.hidden", "/sub/.git/config", "/.autoglm-partial/x/0.part", "/%2ehidden"])
async def test_dotfiles_not_served(site: Path, target: str) -> None:
    (site / ".hidden").write_bytes(b"secret")
    (site / "sub" / ".git").mkdir()
    (site / "sub" / ".git" / "config").write_bytes(b"secret")
    (site / ".autoglm-partial" / "x").mkdir(parents=True)
    (site / ".autoglm-partial" / "x" / "0.part").write_bytes(b"secret")

    async def check(c: httpx.AsyncClient) -> None:
        r = await c.get(target)
        assert r.status_code == 404 and b"secret" not in r.content

    await _with_server(site, check)


async def test_symlink_out_of_root_not_served(site: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside") / "secret"
    outside.write_bytes(b"secret")
    (site / "link").symlink_to(outside)

    async def check(c: httpx.AsyncClient) -> None:
        r = await c.get("/link")
        assert r.status_code == 404

    await _with_server(site, check)


@pytest.mark.parametrize("target", [b"/..%2f..%2fetc/passwd", b"/sub/..%5c..%5cx", b"/%00", b"*", b"//etc/passwd",
                                    b"http://evil/../../etc/passwd"])
async def test_traversal_raw_targets(site: Path, target: bytes) -> None:
    async def check(port: int) -> None:
        raw = await _raw(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _status(raw) in (400, 404), raw[:100]
        assert b"root:" not in raw

    await _with_port(site, check)


# (Range header, expected status, expected body slice of the 10240-byte file or None, Content-Range)
_N = 10240
_RANGES = [
    ("bytes=0-0", 206, (0, 1), "bytes 0-0/10240"),
    ("bytes=-1", 206, (_N - 1, _N), f"bytes {_N - 1}-{_N - 1}/10240"),
    ("bytes=-99999", 206, (0, _N), "bytes 0-10239/10240"),  # suffix longer than the file: all of it
    ("bytes=10200-99999", 206, (10200, _N), "bytes 10200-10239/10240"),
    ("bytes=-0", 416, None, "bytes */10240"),
    ("bytes=10240-", 416, None, "bytes */10240"),
    ("bytes=99999-100000", 416, None, "bytes */10240"),
    # malformed: the header is ignored (RFC 9110 14.2), the whole file is sent
    ("bytes=5-3", 200, (0, _N), None),
    ("bytes=abc", 200, (0, _N), None),
    ("bytes=", 200, (0, _N), None),
    ("bytes=-", 200, (0, _N), None),
    ("bytes=+1-2", 200, (0, _N), None),
    ("items=0-1", 200, (0, _N), None),
    ("bytes=0-" + "9" * 5000, 200, (0, _N), None),
    # several ranges: served whole (a server may ignore Range), never multipart or 416
    ("bytes=0-1,5-6", 200, (0, _N), None),
    ("bytes=" + ",".join(["0-1"] * 500), 200, (0, _N), None),
]


@pytest.mark.parametrize(("value", "status", "span", "crange"), _RANGES)
async def test_range_edge_cases(site: Path, value: str, status: int, span: tuple[int, int] | None,
                                crange: str | None) -> None:
    body = (site / "sub" / "w.bin").read_bytes()
    assert len(body) == _N

    async def check(c: httpx.AsyncClient) -> None:
        r = await c.get("/sub/w.bin", headers={"Range": value})
        assert r.status_code == status
        assert r.headers.get("content-range") == crange
        if span is not None:
            assert r.content == body[span[0]:span[1]]
        r = await c.head("/sub/w.bin", headers={"Range": value})
        assert r.status_code == status and r.content == b""

    await _with_server(site, check)


async def test_oversized_header_gets_431(site: Path) -> None:
    async def check(port: int) -> None:
        raw = await _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
        assert _status(raw) == 431

    await _with_port(site, check)


async def test_slow_reader_is_dropped(site: Path) -> None:
    """A client that never reads its response does not hold a connection slot forever."""
    (site / "big.bin").write_bytes(b"\0" * (64 << 20))
    limits = MirrorLimits(send_timeout=0.5, max_connections=1)

    async def check(port: int) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            while True:  # the one slot frees up once the send timeout drops the reader
                raw = await _raw(port, b"GET /a%20b.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if raw and _status(raw) == 200:
                    break
                await trio.sleep(0.1)
        s.close()

    await _with_port(site, check, limits)


def test_cli_limits_reach_the_server(site: Path, cli_cmd: list[str]) -> None:
    """serve-mirror --max-connections/--header-timeout: a real process, raw sockets."""
    proc = subprocess.Popen([*cli_cmd, "serve-mirror", str(site), "--max-connections", "2", "--header-timeout", "1"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().strip().rsplit(":", 1)[1].strip("/"))
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for s in held:
            s.sendall(b"GET /a")
        time.sleep(0.3)
        probe = socket.create_connection(("127.0.0.1", port), timeout=5)
        probe.sendall(b"GET /a%20b.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert probe.recv(100).startswith(b"HTTP/1.1 503")
        except ConnectionResetError:
            pass  # refused before the 503 was read: refused all the same
        for s in held:  # the header deadline closes them
            s.settimeout(5)
            t0 = time.monotonic()
            assert s.recv(100) == b""
            assert time.monotonic() - t0 < 3
        with httpx.Client(trust_env=False, timeout=5) as client:
            assert client.get(f"http://127.0.0.1:{port}/a%20b.txt").content == b"hello"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 5000), st.integers(0, 6000), st.integers(0, 6000), st.booleans(), st.booleans())
def test_range_rule_matches_rfc_9110(size: int, a: int, b: int, open_end: bool, suffix: bool) -> None:
    from autoglm.node._mirror_server import _parse_range

    if suffix:
        got = _parse_range(f"bytes=-{a}", size)
        assert got == ((max(0, size - a), size) if a > 0 and size > 0 else None)
    elif open_end:
        assert _parse_range(f"bytes={a}-", size) == ((a, size) if a < size else None)
    elif b < a:
        assert _parse_range(f"bytes={a}-{b}", size) is False  # invalid: the header is ignored
    else:
        assert _parse_range(f"bytes={a}-{b}", size) == ((a, min(b + 1, size)) if a < size else None)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40), st.integers(0, 100))
def test_any_range_header_gives_a_span_inside_the_file_or_none(value: str, size: int) -> None:
    from autoglm.node._mirror_server import _parse_range

    got = _parse_range(value, size)
    assert got is None or got is False or (isinstance(got, tuple) and 0 <= got[0] < got[1] <= size)
