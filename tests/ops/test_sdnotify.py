"""sd_notify readiness (Type=notify) over a real unix datagram socket, as systemd listens.

The unit layer sends to a bound socket (path and abstract names); the
integration test runs a real `join` with NOTIFY_SOCKET set and reads what
systemd would: READY=1 with the node's PID once it listens, RELOADING=1 then
READY=1 around a SIGHUP, STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from swarm.harness import CLI, Proc, processes

from autoglm.node._sdnotify import notify


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    s.bind(path)
    s.settimeout(60)
    yield s, path
    s.close()


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_notify_sends_one_datagram_of_assignments(listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    assert notify("READY=1", "STATUS=listening", environ={"NOTIFY_SOCKET": path})
    assert s.recv(4096) == b"READY=1\nSTATUS=listening"


def test_notify_abstract_socket() -> None:
    name = f"autoglm-cost-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(10)
        assert notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert s.recv(4096) == b"READY=1"


def test_notify_without_socket_or_with_a_bad_one_never_raises(tmp_path: Path) -> None:
    assert not notify("READY=1", environ={})
    assert not notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:99"})
    assert not notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_join_reports_ready_reload_and_stopping(tmp_path: Path, listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    with processes() as procs:
        node = Proc([*CLI, "--data-dir", str(tmp_path / "d"), "join", "--json"], "node", tmp_path,
                    {"NOTIFY_SOCKET": path})
        procs.append(node)
        ready = _fields(s.recv(4096))
        assert ready["READY"] == "1" and ready["MAINPID"] == str(node.p.pid)
        # Readiness means the node listens: the ready line (with its address) is already out.
        line = node.event("ready", 30)
        assert ready["STATUS"] == f"listening on {line['addrs'][0]}"
        node.p.send_signal(signal.SIGHUP)
        reloading = _fields(s.recv(4096))
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert _fields(s.recv(4096)) == {"READY": "1"}
        node.p.send_signal(signal.SIGTERM)
        assert _fields(s.recv(4096)) == {"STOPPING": "1"}
        node.event("stopped", 30)
        assert node.p.wait(30) == 0
