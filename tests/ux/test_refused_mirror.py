"""A mirror where nothing listens is given up in a few quick tries; one that answered before is retried."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from autoglm.node._engine import REFUSED_TRIES
from autoglm.node._mirror_server import serve_mirror
from autoglm.node._mirrors import MirrorConfig
from autoglm.node._progress import Event, PieceVerified, SourceFailed
from autoglm.node._publish import build_manifest
from autoglm.node._sample import write_sample_model
from autoglm.node.api import FetchOptions, NodeConfig, open_node
from autoglm.node.errors import NoSourceError
from autoglm.protocol import TrustPolicy, generate_private_key, key_id, sign_manifest

from .throttle import serve_relay

pytestmark = pytest.mark.timeout(120)


def _publish(tmp: Path, size: int) -> tuple[Path, Path, TrustPolicy]:
    root = tmp / "model"
    write_sample_model(root, size=size, seed=b"ux")
    key = generate_private_key()
    raw = key.public_key().public_bytes_raw()
    m = build_manifest(root, name="ux/model", version="1", publisher=key_id(raw), created_at=int(time.time()),
                       max_piece=256 << 10)
    path = tmp / "m.agm"
    path.write_bytes(sign_manifest(m, key).encode())
    return root, path, TrustPolicy(keys=frozenset({raw}))


async def _collect(recv: trio.MemoryReceiveChannel[Event], into: list[Event], first_piece: trio.Event | None = None) -> None:
    async for ev in recv:
        into.append(ev)
        if first_piece is not None and isinstance(ev, PieceVerified):
            first_piece.set()


async def test_a_refused_mirror_is_given_up_after_a_few_quick_tries(tmp_path: Path) -> None:
    _, manifest, trust = _publish(tmp_path, 1 << 20)
    events: list[Event] = []
    send, recv = trio.open_memory_channel[Event](64)
    t0 = trio.current_time()
    async with open_node(NodeConfig(tmp_path / "data")) as node, trio.open_nursery() as nursery:
        nursery.start_soon(_collect, recv, events)
        with pytest.raises(NoSourceError, match="refused"), trio.fail_after(20):
            await node.fetch(manifest, out=tmp_path / "out", trust=trust, mirrors=["http://127.0.0.1:1/"],
                             events=send, options=FetchOptions(space_margin=0))
        send.close()
    seconds = trio.current_time() - t0
    failed = [e for e in events if isinstance(e, SourceFailed)]
    # The default give-up (8 failures with backoff) took 26-34 s and sent 8 of these.
    assert REFUSED_TRIES <= len(failed) <= REFUSED_TRIES + 4  # the first tries run in parallel
    assert [e.permanent for e in failed].count(True) == 1 and failed[-1].permanent
    assert all("refused" in e.message.lower() for e in failed)
    assert seconds < 8, seconds


async def test_a_mirror_that_answered_is_retried_through_an_outage(tmp_path: Path) -> None:
    """The mirror served pieces, then refused connections for 2 s: the fetch waits and completes."""
    root, manifest, trust = _publish(tmp_path, 6 << 20)
    events: list[Event] = []
    send, recv = trio.open_memory_channel[Event](1024)
    # Quick retries so the outage holds many refused tries (a broken rule gives up on the third);
    # failures in a row are not what this test is about.
    cfg = MirrorConfig(backoff_base=0.05, backoff_cap=0.3, initial_connections=2, max_connections=2)
    options = FetchOptions(space_margin=0, max_consecutive_failures=1000)
    async with trio.open_nursery() as outer:
        _, port = await outer.start(serve_mirror, root, "127.0.0.1", 0)
        relay_scope = trio.CancelScope()

        async def relay(listen: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with relay_scope:
                await serve_relay(port, 2 << 20, listen, task_status=task_status)

        relay_port = await outer.start(relay, 0)
        url = f"http://127.0.0.1:{relay_port}/"

        async def outage() -> None:
            with trio.fail_after(30):
                await first_piece.wait()
            relay_scope.cancel()  # the mirror goes away: its connections drop, new ones are refused
            await trio.sleep(2.0)  # the outage itself
            await outer.start(serve_relay, port, 2 << 20, relay_port)
            restarted.set()

        restarted, first_piece = trio.Event(), trio.Event()
        async with open_node(NodeConfig(tmp_path / "data", cfg)) as node, trio.open_nursery() as nursery:
            nursery.start_soon(_collect, recv, events, first_piece)
            nursery.start_soon(outage)
            with trio.fail_after(60):
                await node.fetch(manifest, out=tmp_path / "out", trust=trust, mirrors=[url], events=send,
                                 options=options)
            send.close()
        outer.cancel_scope.cancel()
    assert restarted.is_set()
    failed = [e for e in events if isinstance(e, SourceFailed)]
    refused = [e for e in failed if "refused" in e.message.lower()]
    assert len(refused) > REFUSED_TRIES, [e.message for e in failed]  # it was refused, more than a dead mirror is
    assert not any(e.permanent for e in failed)
    for f in (root).rglob("*"):
        if f.is_file():
            assert (tmp_path / "out" / f.relative_to(root)).read_bytes() == f.read_bytes()
