"""The Hugging Face gateway (``join --hf-gateway``): a real node process between the real
huggingface_hub client and a real Hub-shaped server (tests/hub/hubserver.py).

Each test compares with what the same client gets straight from the Hub server, or
counts what the Hub server sent, so a gateway that served other bytes, fetched twice,
waited for whole files or mislabelled its answers fails here.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from tests.fetch.faultserver import FaultServer

from .conftest import REPO, Hub, clean_env, run_py, tree
from .hubserver import HubServer

BIG = "acme/big-model"
MIB = 1 << 20


@dataclass
class GatewayProc:
    proc: trio.Process
    url: str
    stderr: Path
    lines: list[dict[str, Any]] = field(default_factory=list)


async def _read_lines(stream: trio.abc.ReceiveStream, out: list[dict[str, Any]], first: trio.Event) -> None:
    buf = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            first.set()
            return
        buf += data
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            try:
                out.append(json.loads(raw))
            except ValueError:
                out.append({"event": "text", "text": raw.decode(errors="replace")})
            if out[-1].get("event") in ("ready", "error"):
                first.set()


@asynccontextmanager
async def gateway(tmp: Path, upstream: str, *extra: str, port: int = 0) -> AsyncIterator[GatewayProc]:
    """A real ``autoglm-node join --hf-gateway`` process whose HF_ENDPOINT is ``upstream``."""
    env = clean_env(tmp / "gw", HF_ENDPOINT=upstream, AUTOGLM_DATA_DIR=str(tmp / "gw-data"))
    err = tmp / "gateway.err"
    cmd = [sys.executable, "-m", "autoglm.node.cli", "join", "--json", "--hf-gateway", f"127.0.0.1:{port}", *extra]
    with open(err, "wb") as errf:  # noqa: ASYNC230
        proc = await trio.lowlevel.open_process(cmd, env=env, stdout=-1, stderr=errf)
    lines: list[dict[str, Any]] = []
    ready = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            assert proc.stdout is not None
            nursery.start_soon(_read_lines, proc.stdout, lines, ready)
            with trio.fail_after(60):
                await ready.wait()
            line = next((x for x in lines if x.get("event") == "ready"), None)
            if line is None:
                raise AssertionError(f"the gateway did not start: {lines}\n{err.read_text()}")
            yield GatewayProc(proc, line["hf_gateway"], err, lines)
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            with trio.move_on_after(20):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def http(url: str, method: str = "GET", headers: dict[str, str] | None = None,
               read_until: int | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request (the hub server shares this event loop, so no blocking client)."""
    import h11

    u = url.split("://", 1)[1]
    hostport, _, path = u.partition("/")
    host, _, port = hostport.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    conn = h11.Connection(h11.CLIENT)
    hdrs = [("Host", hostport), ("Connection", "close"), *(headers or {}).items()]
    await stream.send_all(conn.send(h11.Request(method=method, target="/" + path, headers=hdrs)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    status, out, body = 0, {}, bytearray()
    with trio.fail_after(60):
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(1 << 20))
                continue
            if isinstance(ev, h11.Response):
                status = ev.status_code
                out = {k.decode().lower(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                body += ev.data
                if read_until is not None and len(body) >= read_until:
                    break
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    await stream.aclose()
    return status, out, bytes(body)


def _download_code(kind: str, *args: str) -> str:
    if kind == "snapshot":
        return ("from huggingface_hub import snapshot_download\n"
                f"print(snapshot_download({args[0]!r}))\n")
    return ("from huggingface_hub import hf_hub_download\n"
            f"print(hf_hub_download({args[0]!r}, {args[1]!r}))\n")


def _repo_tree(home: Path, repo: str) -> dict[str, str]:
    return tree(home / "hf-home" / "hub" / ("models--" + repo.replace("/", "--")))


async def test_snapshot_and_file_download_match_a_direct_download(hub: Hub, tmp_path: Path) -> None:
    direct = tmp_path / "direct"
    out = await run_py(_download_code("snapshot", REPO), clean_env(direct, HF_ENDPOINT=hub.url))
    assert Path(out.strip()).name == hub.commit
    async with gateway(tmp_path, hub.url) as gw:
        via = tmp_path / "via"
        out = await run_py(_download_code("snapshot", REPO), clean_env(via, HF_ENDPOINT=gw.url))
        snap = Path(out.strip())
        assert snap.name == hub.commit
        for path, data in hub.files.items():
            assert (snap / path).read_bytes() == data, path
        assert _repo_tree(via, REPO) == _repo_tree(direct, REPO)

        # hf_hub_download of one file, by branch, into a fresh cache: the same tree as direct.
        one_direct, one_via = tmp_path / "one-direct", tmp_path / "one-via"
        name = "model-00002-of-00002.safetensors"
        await run_py(_download_code("file", REPO, name), clean_env(one_direct, HF_ENDPOINT=hub.url))
        p = await run_py(_download_code("file", REPO, name), clean_env(one_via, HF_ENDPOINT=gw.url))
        assert Path(p.strip()).read_bytes() == hub.files[name]  # noqa: ASYNC240
        assert _repo_tree(one_via, REPO) == _repo_tree(one_direct, REPO)

        # `hf download` (the CLI), as users type it.
        cli = tmp_path / "cli"
        hf = Path(sys.executable).with_name("hf")
        res = await trio.run_process([str(hf), "download", REPO], env=clean_env(cli, HF_ENDPOINT=gw.url),
                                     capture_stdout=True, capture_stderr=True, check=False)
        assert res.returncode == 0, res.stderr.decode()
        assert _repo_tree(cli, REPO) == _repo_tree(direct, REPO)

        # The headers huggingface_hub relies on, and no Xet.
        st, h, body = await http(f"{gw.url}/{REPO}/resolve/main/{name}", "HEAD")
        sha = hashlib.sha256(hub.files[name]).hexdigest()
        assert st == 200 and body == b""
        assert h["x-repo-commit"] == hub.commit and h["etag"] == f'"{sha}"' and h["x-linked-etag"] == f'"{sha}"'
        assert h["x-linked-size"] == h["content-length"] == str(len(hub.files[name])) and h["accept-ranges"] == "bytes"
        assert not [k for k in h if k.startswith("x-xet")]
    # The node stored each file once, in its own HF cache, verified, in huggingface_hub's layout:
    # the same tree as the direct download, found offline.
    assert _repo_tree(tmp_path / "gw", REPO) == _repo_tree(direct, REPO)
    offline = await run_py("from huggingface_hub import snapshot_download, try_to_load_from_cache\n"
                           f"print(snapshot_download({REPO!r}), try_to_load_from_cache({REPO!r}, 'config.json'))\n",
                           clean_env(tmp_path / "gw", HF_HUB_OFFLINE="1"))
    snap_dir, config = offline.split()
    assert Path(snap_dir).name == hub.commit and Path(config).read_bytes() == hub.files["config.json"]  # noqa: ASYNC240
    blobs = tmp_path / "gw" / "hf-home" / "hub" / "models--acme--tiny-model" / "blobs"
    assert {b.name for b in blobs.iterdir()} == {hashlib.sha256(d).hexdigest() if p.endswith(".safetensors") or len(d) >= 10240
                                                 else _blob_id(d) for p, d in hub.files.items()}


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


async def test_missing_repo_file_and_revision_map_to_huggingface_hub_exceptions(hub: Hub, tmp_path: Path) -> None:
    code = (
        "from huggingface_hub import hf_hub_download, snapshot_download\n"
        "from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError\n"
        "def kind(f):\n"
        "    try:\n"
        "        f()\n"
        "    except RevisionNotFoundError: return 'revision'\n"
        "    except RepositoryNotFoundError: return 'repo'\n"
        "    except EntryNotFoundError: return 'entry'\n"
        "    except Exception as e: return 'other:' + type(e).__name__\n"
        "    return 'none'\n"
        f"print(kind(lambda: hf_hub_download('acme/nope', 'config.json')))\n"
        f"print(kind(lambda: hf_hub_download({REPO!r}, 'nope.json')))\n"
        f"print(kind(lambda: hf_hub_download({REPO!r}, 'config.json', revision='v9')))\n"
        f"print(kind(lambda: snapshot_download('acme/nope')))\n"
        f"print(kind(lambda: snapshot_download({REPO!r}, revision='v9')))\n"
    )
    want = (await run_py(code, clean_env(tmp_path / "direct", HF_ENDPOINT=hub.url))).split()
    assert want == ["repo", "entry", "revision", "repo", "revision"]
    async with gateway(tmp_path, hub.url) as gw:
        got = (await run_py(code, clean_env(tmp_path / "via", HF_ENDPOINT=gw.url))).split()
    assert got == want


class SlowTail(FaultServer):
    """A CDN that answers a request starting at or after ``tail`` bytes only after ``pause`` seconds."""

    tail = 16 * MIB
    pause = 3.0

    async def _respond(self, stream: trio.SocketStream, method: str, target: str, headers: dict[str, str], reused: bool = False) -> bool:
        rng = headers.get("range", "")
        start = rng.removeprefix("bytes=").partition("-")[0]
        if start.isdigit() and int(start) >= self.tail:
            await trio.sleep(self.pause)
        return await super()._respond(stream, method, target, headers, reused)


@pytest.fixture
async def big_hub(tmp_path: Path) -> AsyncIterator[tuple[HubServer, FaultServer, dict[str, bytes], str]]:
    root = tmp_path / "bigroot"
    cdn = SlowTail(root)
    server = HubServer(root, cdn=cdn)
    files = {"config.json": b'{"model_type": "big"}', "big.safetensors": os.urandom(24 * MIB + 12345)}
    commit = server.add_commit(BIG, files)
    async with trio.open_nursery() as nursery:
        await nursery.start(cdn.serve)
        await nursery.start(server.serve)
        yield server, cdn, files, commit
        nursery.cancel_scope.cancel()


async def test_bytes_stream_as_pieces_arrive_and_clients_share_one_fetch(
    big_hub: tuple[HubServer, FaultServer, dict[str, bytes], str], tmp_path: Path
) -> None:
    server, cdn, files, commit = big_hub
    data = files["big.safetensors"]
    obj = "objects/" + hashlib.sha256(data).hexdigest()
    async with gateway(tmp_path, f"http://127.0.0.1:{server.port}") as gw:
        url = f"{gw.url}/{BIG}/resolve/main/big.safetensors"
        # The first 8 MiB reach the client while the upstream still holds back the file's tail.
        st, h, head = await http(url, read_until=8 * MIB)
        assert st == 200 and h["content-length"] == str(len(data))
        assert head[: 8 * MIB] == data[: 8 * MIB]
        assert cdn.stats.by_path.get(obj, 0) < len(data), "the client waited for the whole file"
        # Two real clients, the second while the first is still waiting for the tail: one copy upstream.
        code = _download_code("file", BIG, "big.safetensors")
        results: list[str] = []

        async def client(name: str, delay: float) -> None:
            await trio.sleep(delay)
            results.append(await run_py(code, clean_env(tmp_path / name, HF_ENDPOINT=gw.url)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client, "c1", 0.0)
            nursery.start_soon(client, "c2", 0.5)
        for out in results:
            assert Path(out.strip()).read_bytes() == data  # noqa: ASYNC240
        # Range requests: a middle slice, a suffix, and an unsatisfiable one.
        st, h, body = await http(url, headers={"Range": "bytes=1000-1999"})
        assert st == 206 and body == data[1000:2000] and h["content-range"] == f"bytes 1000-1999/{len(data)}"
        st, h, body = await http(url, headers={"Range": "bytes=-5000"})
        assert st == 206 and body == data[-5000:]
        st, h, _ = await http(url, headers={"Range": f"bytes={len(data)}-"})
        assert st == 416 and h["content-range"] == f"bytes */{len(data)}"
    # Every client above (raw, two huggingface_hub processes, ranges) shared one upstream copy.
    assert cdn.stats.by_path[obj] == len(data)


async def test_wrong_upstream_bytes_are_never_served_whole(
    big_hub: tuple[HubServer, FaultServer, dict[str, bytes], str], tmp_path: Path
) -> None:
    """A file of several pieces whose upstream bytes do not match the Hub's SHA-256: clients
    may have got a prefix, never the whole file; then an error answer, not bytes."""
    server, cdn, files, commit = big_hub
    name = "big.safetensors"
    data = files[name]
    sha = hashlib.sha256(data).hexdigest()
    cdn.add("wrong", count=100, path=f"objects/{sha}")
    code = (
        "from huggingface_hub import hf_hub_download\n"
        "try:\n"
        f"    p = hf_hub_download({BIG!r}, {name!r})\n"
        "    print('served', open(p, 'rb').read().hex()[:64])\n"
        "except Exception as e:\n"
        "    print('error', type(e).__name__)\n"
    )
    async with gateway(tmp_path, f"http://127.0.0.1:{server.port}") as gw:
        url = f"{gw.url}/{BIG}/resolve/main/{name}"
        raw: list[tuple[int, dict[str, str], bytes]] = []

        async def raw_client() -> None:
            try:
                raw.append(await http(url))
            except Exception as exc:  # cut short: h11 refuses the incomplete body
                raw.append((-1, {}, repr(exc).encode()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw_client)
            out = await run_py(code, clean_env(tmp_path / "client", HF_ENDPOINT=gw.url))
        assert out.split()[0] == "error", out
        assert raw[0][2] != data and len(raw[0][2]) < len(data)
        # Afterwards a client gets an error answer, not the bytes.
        st, h, body = await http(url)
        assert st == 502 and body != data and "match" in h.get("x-error-message", "")
    blobs = tmp_path / "client" / "hf-home" / "hub" / ("models--" + BIG.replace("/", "--")) / "blobs"
    assert not (blobs / sha).exists()
    assert not (tmp_path / "gw" / "hf-home" / "hub" / ("models--" + BIG.replace("/", "--")) / "blobs" / sha).exists()


async def test_a_client_waiting_on_a_stalled_stream_is_kept_reading_not_timed_out(
    big_hub: tuple[HubServer, FaultServer, dict[str, bytes], str], tmp_path: Path
) -> None:
    """The file's tail stands still upstream longer than the client's read timeout: the gateway
    holds back a little of the verified prefix and drips it, so the real client's one request
    completes instead of timing out and asking again with Range."""
    server, cdn, files, commit = big_hub
    cdn.pause = 10.0  # the tail (past 16 MiB) arrives 10 s late
    name = "big.safetensors"
    code = (
        "import logging\n"
        "seen = []\n"
        "class Seen(logging.Handler):\n"
        "    def emit(self, record): seen.append(record.getMessage())\n"
        "logging.getLogger('huggingface_hub').addHandler(Seen())\n"
        "from huggingface_hub import hf_hub_download\n"
        f"p = hf_hub_download({BIG!r}, {name!r})\n"
        "print(p)\n"
        "print(sum('resume' in m for m in seen))\n"
    )
    async with gateway(tmp_path, f"http://127.0.0.1:{server.port}") as gw:
        # huggingface_hub gives up on a read after HF_HUB_DOWNLOAD_TIMEOUT seconds without a byte (10 by default)
        out = await run_py(code, clean_env(tmp_path / "client", HF_ENDPOINT=gw.url, HF_HUB_DOWNLOAD_TIMEOUT="6"))
    path, resumes = out.split()
    assert Path(path).read_bytes() == files[name]  # noqa: ASYNC240
    assert resumes == "0", "the client's read timed out and it asked again"


async def test_a_gateway_whose_upstream_is_itself_refuses_to_start(tmp_path: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    for upstream in (f"http://127.0.0.1:{port}", f"http://localhost:{port}/"):
        env = clean_env(tmp_path / "gw", HF_ENDPOINT=upstream, AUTOGLM_DATA_DIR=str(tmp_path / "gw-data"))
        res = await trio.run_process([sys.executable, "-m", "autoglm.node.cli", "join", "--hf-gateway", f"127.0.0.1:{port}"],
                                     env=env, capture_stdout=True, capture_stderr=True, check=False)
        assert res.returncode != 0
        assert b"is the gateway itself" in res.stderr, res.stderr


async def test_a_loop_through_another_address_is_detected_by_the_gateway_header(tmp_path: Path) -> None:
    """An upstream name the address check cannot tell apart (IPv4-mapped IPv6): the probe's header finds the loop."""
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = clean_env(tmp_path / "gw", HF_ENDPOINT=f"http://[::ffff:127.0.0.1]:{port}", AUTOGLM_DATA_DIR=str(tmp_path / "gw-data"))
    res = await trio.run_process([sys.executable, "-m", "autoglm.node.cli", "join", "--hf-gateway", f"127.0.0.1:{port}"],
                                 env=env, capture_stdout=True, capture_stderr=True, check=False)
    if b"Address family" in res.stderr or b"cannot connect" in res.stderr:
        pytest.skip("IPv4-mapped addresses unavailable here")
    assert res.returncode != 0 and b"leads back to this gateway" in res.stderr, res.stderr


# -- budgets: the gateway in this process, real sockets --------------------------------------


@asynccontextmanager
async def local_gateway(tmp: Path, **budgets: Any) -> AsyncIterator[Any]:
    from autoglm.node._store import Store
    from autoglm.node.hub._gateway import GatewayConfig, serve_gateway

    store = Store(tmp / "data")
    try:
        async with trio.open_nursery() as nursery:
            cfg = GatewayConfig(endpoints=("http://127.0.0.1:9",), cache_dir=tmp / "cache", probe_timeout=0.5, **budgets)
            gw = await nursery.start(serve_gateway, store, cfg)
            yield gw
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send ``data``, read until the gateway closes the connection (or ``wait`` seconds)."""
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(data)
    out = b""
    with trio.move_on_after(wait):
        while chunk := await s.receive_some(65536):
            out += chunk
    await s.aclose()
    return out


async def test_client_budgets(tmp_path: Path) -> None:
    async with local_gateway(tmp_path, max_clients=2, header_timeout=0.5, idle_timeout=1.0) as gw:
        port = gw.address[1]
        # Request bodies are refused, and the connection closed.
        out = await _raw(port, b"POST /api/models/a/b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        assert out.startswith(b"HTTP/1.1 413 ")
        # Methods other than GET/HEAD: 405.
        out = await _raw(port, b"DELETE /a/b/resolve/main/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 405 ") and f"x-autoglm-gateway: {gw.id}".encode() in out.lower()
        # A head that never ends is dropped after header_timeout, not held.
        t0 = trio.current_time()
        out = await _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n", wait=10)
        assert out == b"" and trio.current_time() - t0 < 5
        # A head larger than 16 KiB: refused.
        out = await _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", wait=10)
        assert not out.startswith(b"HTTP/1.1 200")
        # Connection cap: two idle clients held, the third answered 503 at once.
        a = await trio.open_tcp_stream("127.0.0.1", port)
        b = await trio.open_tcp_stream("127.0.0.1", port)
        await trio.sleep(0.2)
        out = await _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", wait=5)
        assert out.startswith(b"HTTP/1.1 503 ") and gw.stats.refused_clients == 1
        await a.aclose()
        await b.aclose()
        # Idle connections are closed after idle_timeout, and the slots come back.
        c = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await c.receive_some(10) == b""
        await c.aclose()
        await trio.sleep(0.2)
        assert gw.stats.clients == 0


async def test_a_client_that_stops_reading_is_cut_off_after_the_send_timeout(hub: Hub, tmp_path: Path) -> None:
    """Bodies go out with sendfile: a client that stops reading fills its socket, the gateway waits for it at most
    send_timeout, then closes it and frees its slot; a client reading at the same time gets the whole file."""
    import socket

    from autoglm.node._store import Store
    from autoglm.node.hub._gateway import GatewayConfig, serve_gateway

    data = np.random.default_rng(21).bytes(48 * MIB)
    hub.server.add_commit(BIG, {"config.json": b"{}", "weights.bin": data})
    store = Store(tmp_path / "data")
    try:
        async with trio.open_nursery() as nursery:
            cfg = GatewayConfig(endpoints=(hub.url,), cache_dir=tmp_path / "cache", send_timeout=1.0, probe_timeout=0.5)
            gw = await nursery.start(serve_gateway, store, cfg)
            url = f"http://127.0.0.1:{gw.address[1]}/{BIG}/resolve/main/weights.bin"
            st, _, body = await http(url)  # the node fetches it once; then it is served from the blob
            assert st == 200 and body == data
            stuck = trio.socket.socket()
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            await stuck.connect(("127.0.0.1", gw.address[1]))
            await stuck.send(f"GET /{BIG}/resolve/main/weights.bin HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            st, _, body = await http(url)  # served meanwhile, whole
            assert st == 200 and body == data
            await trio.sleep(cfg.send_timeout + 2.0)  # the time the budget needs to run out: nothing to wait on
            assert gw.stats.clients == 0  # the stuck client was dropped and its slot freed
            got = 0
            with trio.fail_after(10):
                while chunk := await stuck.recv(1 << 20):
                    got += len(chunk)
            assert 0 < got < len(data)  # what the socket buffers held, then the end of the connection
            stuck.close()
            nursery.cancel_scope.cancel()
    finally:
        store.close()
