"""doctor checks as pure functions of their inputs; the network ones against 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from autoglm.node._device import CpuInfo, DeviceInfo, GpuInfo
from autoglm.node._doctor import (
    check_bootstrap,
    check_clock,
    check_data_dir,
    check_proxies,
    check_sandbox,
    check_torch_cuda,
    parse_multiaddr,
)

GiB = 1 << 30
D = DeviceInfo("Linux", "x86_64", "3.11.7", CpuInfo("cpu", 4, 2, ()), 8 * GiB, 8 * GiB, 100 * GiB, None)
H100 = GpuInfo(0, "H100", 80 * GiB, 80 * GiB, (9, 0))


@pytest.mark.parametrize(
    ("torch", "cuda", "driver", "gpus", "status"),
    [
        (None, None, None, (), "pass"),
        ("2.3.1", None, None, (), "pass"),
        ("2.3.1", None, None, (H100,), "warn"),
        ("2.3.1+cu121", "12.1", "12.4", (H100,), "pass"),
        ("2.1.0", "11.8", "12.2", (H100,), "pass"),
        ("2.1.0", "12.4", "12.4", (H100,), "warn"),  # not a published pair
        ("2.3.1", "12.1", "11.8", (H100,), "fail"),  # driver older than the toolkit
        ("9.9.0", "12.1", None, (), "warn"),  # unknown torch
    ],
)
def test_torch_cuda_table(torch: str | None, cuda: str | None, driver: str | None, gpus: tuple[GpuInfo, ...], status: str) -> None:
    d = replace(D, torch_version=torch, torch_cuda=cuda, cuda_driver=driver, gpus=gpus)
    assert check_torch_cuda(d).status == status


def test_clock() -> None:
    assert check_clock(datetime(2026, 1, 1, tzinfo=UTC)).status == "pass"
    bad = check_clock(datetime(1970, 1, 1, tzinfo=UTC))
    assert bad.status == "fail" and "NTP" in bad.hint


def test_proxies() -> None:
    assert check_proxies({}).status == "pass"
    assert check_proxies({"HTTPS_PROXY": "http://p:3128"}).status == "warn"
    assert check_proxies({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "localhost,127.0.0.1"}).status == "pass"
    assert check_proxies({"http_proxy": "p:3128"}).status == "fail"


def test_data_dir(tmp_path: Path) -> None:
    assert check_data_dir(tmp_path / "new", 100 * GiB).status == "pass"
    assert check_data_dir(tmp_path, 5 * GiB).status == "warn"
    assert check_data_dir(tmp_path, GiB // 2).status == "fail"
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert check_data_dir(ro / "x", 100 * GiB).status == "fail"


def test_multiaddr() -> None:
    assert parse_multiaddr("/ip4/10.0.0.1/tcp/4001/p2p/12D3Koo") == ("10.0.0.1", 4001)
    assert parse_multiaddr("/dns4/boot.example/tcp/443") == ("boot.example", 443)
    with pytest.raises(ValueError):
        parse_multiaddr("/ip4/1.2.3.4/udp/4001/quic")


def test_bootstrap_reachability() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        assert check_bootstrap(f"/ip4/127.0.0.1/tcp/{port}/p2p/x").status == "pass"
    assert check_bootstrap(f"/ip4/127.0.0.1/tcp/{port}").status == "fail"
    assert check_bootstrap("garbage").status == "fail"


def test_sandbox_self_test() -> None:
    assert check_sandbox().status == "pass"


def test_doctor_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from autoglm.node.cli import _verify_cmds

    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, default=tmp_path)
    _verify_cmds.register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["doctor", "--json"])
    rc = ns.func(ns)
    out = json.loads(capsys.readouterr().out)
    assert {c["name"] for c in out["checks"]} >= {"data-dir", "proxy", "clock", "gpu", "torch-cuda", "sandbox"}
    assert out["device"]["cpu"]["logical_cores"] >= 1
    assert rc == (0 if out["ok"] else 9)
    for c in out["checks"]:
        assert c["status"] in ("pass", "warn", "fail") and c["detail"]
