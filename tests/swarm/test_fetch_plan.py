"""One FetchPlan for every entry point: each `fetch` flag reaches the engine on every path.

The paths: a fetch from mirrors alone (``Node.run_fetch``), an ephemeral
swarm node (``fetch_with_peers``, what `fetch --bootstrap` runs) and a fetch
handed to a running node over the control API. A real HTTP mirror records
the headers of every request; the engine's settings are read from the
running fetch (its options and its mirror sources) or, for a running node,
from its status.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from fetch.conftest import Published, publish
from fetch.faultserver import FaultServer
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.node._engine import Fetch, FetchOptions
from autoglm.node._mirrors import MirrorConfig, MirrorSource
from autoglm.node._plan import FetchPlan
from autoglm.node._sources import SourceKind
from autoglm.node._swarm_node import JoinConfig, fetch_with_peers, open_swarm_node
from autoglm.node.api import NodeConfig, open_node
from autoglm.node.cli._fetch_cmds import _plan_wire
from autoglm.node.cli._main import build_parser
from autoglm.node.errors import ConfigError
from autoglm.protocol import TrustPolicy

pytestmark = pytest.mark.timeout(120)


def _flags(pub: Published, url: str) -> list[str]:
    return [
        str(pub.manifest_path), "--out", "OUT", "--trust", str(pub.pub_path), "--mirror", url,
        "--header", "X-Common: c1", "--mirror-header", f"{url}=X-Own: o1",
        "--connections", "1", "--max-connections", "3", "--stall-timeout", "7.5",
        "--check-sha256", "--no-space-check",
    ]


def _args(tmp: Path, flags: list[str]) -> argparse.Namespace:
    flags = [str(tmp / "out") if f == "OUT" else f for f in flags]
    args = build_parser("fetch").parse_args(["--data-dir", str(tmp / "cli"), "fetch", *flags])
    args.data_dir = Path(args.data_dir)
    return args


def _assert_engine_got_the_flags(fetch: Fetch, url: str) -> None:
    assert fetch.options.check_sha256 is True and fetch.options.check_space is False
    [mirror] = [s for s in fetch.sources() if s.kind is SourceKind.MIRROR]
    assert isinstance(mirror, MirrorSource)
    assert mirror.headers == {"X-Common": "c1", "X-Own": "o1"}
    cfg = mirror.config
    assert (cfg.initial_connections, cfg.max_connections, cfg.stall_timeout) == (1, 3, 7.5)


def _assert_mirror_saw_the_headers(server: FaultServer) -> None:
    assert server.stats.headers, "the mirror got no request"
    for h in server.stats.headers:
        assert h.get("x-common") == "c1" and h.get("x-own") == "o1", h


@pytest.fixture
def pub(tmp_path: Path) -> Published:
    return publish(tmp_path / "pub", size=256 << 10)


@pytest.fixture
async def mirror(pub: Published) -> AsyncIterator[FaultServer]:
    srv = FaultServer(pub.root)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        yield srv
        nursery.cancel_scope.cancel()


def test_every_flag_is_in_the_plan(tmp_path: Path, pub: Published) -> None:
    url = "http://127.0.0.1:1/m/"
    plan = FetchPlan.from_wire(_plan_wire(_args(tmp_path, _flags(pub, url)), ["a.bin"]), pub.trust)
    assert plan.manifest == str(pub.manifest_path.resolve()) and plan.out == (tmp_path / "out").resolve()
    assert plan.mirrors == (url,) and plan.files == ("a.bin",)
    assert plan.headers_for(url) == {"X-Common": "c1", "X-Own": "o1"}
    assert plan.mirror == MirrorConfig(initial_connections=1, max_connections=3, stall_timeout=7.5)
    assert plan.options == FetchOptions(check_sha256=True, check_space=False)


def test_the_wire_form_round_trips(pub: Published) -> None:
    plan = FetchPlan(
        "/m.agm", Path("/out"), pub.trust, mirrors=("http://a/", "http://b/"), headers={"A": "1"},
        mirror_headers={"http://b": {"B": "2"}}, mirror=MirrorConfig(stall_timeout=3.0),
        options=FetchOptions(space_margin=5, check_sha256=True), files=("x",),
    )
    assert FetchPlan.from_wire(plan.to_wire(), pub.trust) == plan
    assert plan.headers_for("http://b/") == {"A": "1", "B": "2"} and plan.headers_for("http://a/") == {"A": "1"}


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"manifest": None}, "manifest"),
        ({"mirrors": "http://a/"}, "mirrors"),
        ({"headers": {"A": 1}}, "headers"),
        ({"mirror_config": {"stall_timeout": "soon"}}, "stall_timeout"),
        ({"mirror_config": {"initial_connections": 1.5}}, "initial_connections"),
        ({"options": {"check_sha256": 1}}, "check_sha256"),
        ({"options": {"no_such_option": True}}, "no_such_option"),
        ({"mirror_headers": {"http://elsewhere/": {"A": "1"}}}, "not one of the mirrors"),
    ],
)
def test_a_malformed_wire_plan_is_a_config_error(pub: Published, change: dict[str, Any], why: str) -> None:
    wire = {**FetchPlan("/m.agm", Path("/out"), pub.trust, mirrors=("http://a/",)).to_wire(), **change}
    with pytest.raises(ConfigError, match=why):
        FetchPlan.from_wire(wire, pub.trust)


def _plan(tmp: Path, pub: Published, url: str) -> FetchPlan:
    return FetchPlan.from_wire(_plan_wire(_args(tmp, _flags(pub, url)), None), pub.trust)


async def test_mirrors_alone_path(tmp_path: Path, pub: Published, mirror: FaultServer) -> None:
    plan = _plan(tmp_path, pub, mirror.url)
    async with open_node(NodeConfig(tmp_path / "data")) as node, trio.open_nursery() as nursery:
        with trio.fail_after(60):
            fetch = await nursery.start(node.run_fetch, plan)
            _assert_engine_got_the_flags(fetch, mirror.url)
    _assert_mirror_saw_the_headers(mirror)
    pub.assert_identical(tmp_path / "out")


async def test_ephemeral_swarm_node_path(tmp_path: Path, pub: Published, mirror: FaultServer) -> None:
    plan = _plan(tmp_path, pub, mirror.url)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            fetch = await nursery.start(lambda task_status: fetch_with_peers(
                JoinConfig(tmp_path / "eph"), plan, task_status=task_status))
            _assert_engine_got_the_flags(fetch, mirror.url)
    _assert_mirror_saw_the_headers(mirror)
    pub.assert_identical(tmp_path / "out")


async def test_fetch_command_with_bootstrap_peers_path(tmp_path: Path, pub: Published, mirror: FaultServer) -> None:
    """`fetch --bootstrap` runs an ephemeral node: the headers still reach the mirror (they were dropped)."""
    from autoglm.node.cli._main import main

    async with open_swarm_node(JoinConfig(tmp_path / "boot", control_api=False)) as boot:
        flags = [f if f != "OUT" else str(tmp_path / "out") for f in _flags(pub, mirror.url)]
        argv = ["--data-dir", str(tmp_path / "cli"), "fetch", *flags, "--json", "--bootstrap", boot.p2p.addrs()[0]]
        with trio.fail_after(60):
            rc = await trio.to_thread.run_sync(main, argv)
    assert rc == 0
    _assert_mirror_saw_the_headers(mirror)
    pub.assert_identical(tmp_path / "out")


async def test_handed_to_a_running_node_path(tmp_path: Path, pub: Published, mirror: FaultServer) -> None:
    """The real `fetch` command hands the plan to a running node over the control socket."""
    from autoglm.node.cli._fetch_cmds import cmd_fetch

    args = _args(tmp_path, [*_flags(pub, mirror.url), "--json"])
    async with open_swarm_node(JoinConfig(args.data_dir)) as node:
        with trio.fail_after(60):
            rc = await trio.to_thread.run_sync(cmd_fetch, args)
        assert rc == 0
        [model] = node.status()["models"].values()
    assert model["complete"]
    assert model["plan"] == {
        "mirrors": [mirror.url], "header_names": ["X-Common"], "mirror_header_names": {mirror.url: ["X-Own"]},
        "connections": 1, "max_connections": 3, "stall_timeout": 7.5, "check_sha256": True, "check_space": False,
        "files": None,
    }
    _assert_mirror_saw_the_headers(mirror)
    pub.assert_identical(tmp_path / "out")


_text = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)


@settings(max_examples=50)
@given(
    mirrors=st.lists(_text.map(lambda t: f"http://{t}/"), unique=True, max_size=3),
    headers=st.dictionaries(_text, st.text(max_size=10), max_size=3),
    connections=st.integers(1, 64),
    stall=st.floats(0.1, 600),
    sha=st.booleans(),
    space=st.booleans(),
    files=st.none() | st.lists(_text, max_size=3),
)
def test_any_plan_survives_the_wire(
    mirrors: list[str], headers: dict[str, str], connections: int, stall: float, sha: bool, space: bool,
    files: list[str] | None,
) -> None:
    trust = TrustPolicy()
    plan = FetchPlan(
        "/m.agm", Path("/out"), trust, mirrors=tuple(mirrors), headers=headers,
        mirror_headers={m: {"X-Own": m} for m in mirrors[:1]},
        mirror=MirrorConfig(initial_connections=connections, stall_timeout=stall),
        options=FetchOptions(check_sha256=sha, check_space=space), files=None if files is None else tuple(files),
    )
    wire = json.loads(json.dumps(plan.to_wire()))  # what the control socket carries
    assert FetchPlan.from_wire(wire, trust) == plan


def test_a_plan_prints_readably_and_never_shows_header_values(tmp_path: Path) -> None:
    secret = "Bearer s3cr3t-token-value"
    plan = FetchPlan("http://127.0.0.1:1/m.agm", tmp_path / "out", TrustPolicy(),
                     mirrors=("http://127.0.0.1:1/",), headers={"Authorization": secret},
                     mirror_headers={"http://127.0.0.1:1/": {"X-Key": "other-secret"}})
    text = repr(plan)
    assert "s3cr3t" not in text and "other-secret" not in text
    assert "Authorization" in text and "X-Key" in text and "m.agm" in text and len(text) < 400
