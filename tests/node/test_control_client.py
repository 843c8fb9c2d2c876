"""The blocking control-API client against a real unix socket (a thread plays the node)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from autoglm.node._control_client import MAX_LINE, connect, request, socket_path
from autoglm.node.errors import ProtocolError, SourceError


@contextmanager
def fake_node(data_dir: Path, reply: Callable[[socket.socket, bytes], None]) -> Iterator[None]:
    """Serve one connection on DATA_DIR/control.sock: read the request line, then ``reply``."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(socket_path(data_dir)))
    srv.listen(1)
    srv.settimeout(10)

    def run() -> None:
        conn, _ = srv.accept()
        with conn:
            buf = b""
            while not buf.endswith(b"\n"):
                buf += conn.recv(4096)
            reply(conn, buf)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield
    finally:
        t.join(10)
        srv.close()


def test_no_node_running(tmp_path: Path) -> None:
    assert connect(tmp_path) is None
    with pytest.raises(SourceError, match="no running node"):
        next(request(tmp_path, {"op": "status"}))


def test_lines_arrive_one_by_one_whatever_the_segmentation(tmp_path: Path) -> None:
    seen: list[bytes] = []

    def reply(conn: socket.socket, req: bytes) -> None:
        seen.append(req)
        data = b'{"event": "start"}\n{"event": "pie' + b'ce", "index": 1}\n{"event": "result"}\n'
        for i in range(0, len(data), 7):
            conn.sendall(data[i : i + 7])

    with fake_node(tmp_path, reply):
        lines = list(request(tmp_path, {"op": "fetch", "x": 1}, timeout=10))
    assert seen == [b'{"op": "fetch", "x": 1}\n']
    assert [ln["event"] for ln in lines] == ["start", "piece", "result"]


@pytest.mark.parametrize(
    ("payload", "match"),
    [(b"not json\n", "not JSON"), (b"[1, 2]\n", "not a JSON object"), (b"x" * (MAX_LINE + 70_000), "line over")],
)
def test_a_bad_reply_is_a_protocol_error(tmp_path: Path, payload: bytes, match: str) -> None:
    with fake_node(tmp_path, lambda conn, _: conn.sendall(payload)), pytest.raises(ProtocolError, match=match):
        list(request(tmp_path, {"op": "status"}, timeout=10))


def test_a_silent_node_times_out(tmp_path: Path) -> None:
    gate = threading.Event()
    with fake_node(tmp_path, lambda conn, _: gate.wait(10)):
        with pytest.raises(SourceError, match="did not answer 'status' in 0.3 s"):
            list(request(tmp_path, {"op": "status"}, timeout=0.3))
        gate.set()
