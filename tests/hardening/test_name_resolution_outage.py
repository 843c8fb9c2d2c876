"""Name resolution outage (#11 item 13): a peer that connects and then vanishes must not stall resolution.

A node with no cached record asks the network. A peer that connected to it
and then went silent (here: a real process, stopped with SIGSTOP, so its
TCP connection stays open and nothing ever answers) used to hold the closest
-peer lookup, and with it the whole resolution, for the full DHT timeout
(20 s), after which the node returned nothing although an honest peer held
the record. Each peer's part of the lookup now has its own bound
(``_PEER_QUERY_TIMEOUT``, 5 s), and the honest answer wins.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import trio

from autoglm.node import _p2p
from autoglm.node._p2p import open_p2p
from autoglm.protocol import generate_private_key
from autoglm.protocol._namerecord import sign_name_record

logging.getLogger("libp2p").setLevel(logging.CRITICAL)

# A peer that joins the victim and then stays connected without a word.
_VANISHER = textwrap.dedent(
    """
    import sys, trio
    from pathlib import Path
    from autoglm.node._p2p import open_p2p

    async def main() -> None:
        async with open_p2p(Path(sys.argv[1]), bootstrap=[sys.argv[2]]) as node:
            print(node.peer_id, flush=True)
            await trio.sleep(120)  # stopped with SIGSTOP long before this

    trio.run(main)
    """
)


async def test_a_vanished_peer_does_not_stall_name_resolution(tmp_path: Path) -> None:
    key = generate_private_key()
    rec = sign_name_record(key, "org/model", b"\x07" * 32, "1.0", 3)
    bound = _p2p._PEER_QUERY_TIMEOUT * 2 + 2.0  # a silent peer costs its own query, not the lookup
    assert bound < _p2p._DHT_TIMEOUT
    with trio.fail_after(90):
        async with open_p2p(tmp_path / "holder") as holder:
            await holder.put_name_record(rec)
            async with open_p2p(tmp_path / "victim", bootstrap=holder.addrs()) as victim:
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-c", _VANISHER, str(tmp_path / "vanisher"), victim.addrs()[0]],
                    stdout=subprocess.PIPE,
                )
                try:
                    assert proc.stdout is not None
                    line = b""
                    while not line.endswith(b"\n"):
                        chunk = await proc.stdout.receive_some(256)
                        assert chunk, "the vanishing peer exited early"
                        line += chunk
                    vanisher = line.decode().strip()
                    # libp2p has no event for "this peer is connected here"; bounded by fail_after.
                    while vanisher not in {str(p) for p in victim._host.get_connected_peers()}:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                    os.kill(proc.pid, signal.SIGSTOP)  # connected, and from now on silent
                    assert victim._dht.value_store.get(rec.key.encode()) is None
                    t0 = trio.current_time()
                    got = await victim.get_name_record(rec.publisher, "org/model")
                    took = trio.current_time() - t0
                    assert got == rec, "the honest holder's record was lost behind the silent peer"
                    assert took < bound, f"resolution waited {took:.1f} s on a silent peer"
                finally:
                    proc.kill()
                    os.kill(proc.pid, signal.SIGCONT)
                    await proc.wait()
