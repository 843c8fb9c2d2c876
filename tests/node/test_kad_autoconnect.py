"""A node dials only whom it needs: py-libp2p's auto-connector is off (node/_p2p.py).

The auto-connector dials every peer in the peerstore it is not connected to,
and every DHT answer puts up to 20 peers there: in a 64-host run every host
went on dialling every other, and the DHT never formed (docs/benchmarks.md,
"The DHT at scale"). Real hosts on 127.0.0.1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import multiaddr
import trio
from libp2p.peer.id import ID

from autoglm.node._p2p import open_p2p

logging.getLogger("libp2p").setLevel(logging.CRITICAL)


async def test_a_peer_in_the_peerstore_is_not_dialled_on_its_own(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_p2p(tmp_path / "a") as a, open_p2p(tmp_path / "b") as b:
            host = a._host
            pid = ID.from_base58(b.peer_id)
            # What a DHT answer naming b leaves behind.
            host.get_peerstore().add_addrs(pid, [multiaddr.Multiaddr(x.rsplit("/p2p/", 1)[0]) for x in b.addrs()], 3600)
            network = host.get_network()
            # The periodic tick and the after-a-disconnect trigger both come down to this.
            await network.auto_connector.maybe_connect()
            assert b.peer_id not in a.connected_peers()
            assert a.peer_id not in b.connected_peers()
            # The address is still good: an explicit dial (a walk's, a session's) connects.
            await a.connect(b.addrs()[0])
            assert b.peer_id in a.connected_peers()
