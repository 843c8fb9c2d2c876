"""Name record rollback: an old, validly signed record pushed to a node must not win over the network.

A peer sends PUT_VALUE with seq 1 to a node that holds no record while the
rest of the network holds seq 2. py-libp2p's get_value answers from the local
store first, so the node used to resolve the stale manifest for the record's
lifetime. Resolution now compares the local record with what the network
returns and prefers the highest valid sequence number (and heals the local
copy).
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio
from libp2p.peer.id import ID

from autoglm.node._p2p import open_p2p
from autoglm.protocol import generate_private_key
from autoglm.protocol._namerecord import sign_name_record

logging.getLogger("libp2p").setLevel(logging.CRITICAL)


async def test_stale_record_pushed_to_a_node_does_not_shadow_the_network(tmp_path: Path) -> None:
    key = generate_private_key()
    old = sign_name_record(key, "org/model", b"\x01" * 32, "1.0", 1)
    new = sign_name_record(key, "org/model", b"\x02" * 32, "1.1", 2)
    with trio.fail_after(60):
        async with open_p2p(tmp_path / "a") as a, open_p2p(tmp_path / "b", bootstrap=a.addrs()) as b:
            await a.put_name_record(new)
            async with open_p2p(tmp_path / "victim", bootstrap=a.addrs()) as victim, \
                    open_p2p(tmp_path / "attacker", bootstrap=victim.addrs()) as attacker:
                assert victim._dht.value_store.get(new.key.encode()) is None
                # The attacker speaks plain Kademlia PUT_VALUE to the victim.
                stored = await attacker._dht.value_store._store_at_peer(
                    ID.from_base58(victim.peer_id), new.key.encode(), old.encode())
                assert stored
                held = victim._dht.value_store.get(new.key.encode())
                assert held is not None and held.value == old.encode()  # the push landed
                got = await victim.get_name_record(new.publisher, "org/model")
                assert got == new
                # ...and the victim's own copy was replaced by the newer record.
                held = victim._dht.value_store.get(new.key.encode())
                assert held is not None and held.value == new.encode()
            assert await b.get_name_record(new.publisher, "org/model") == new


async def test_local_record_still_resolves_alone(tmp_path: Path) -> None:
    key = generate_private_key()
    rec = sign_name_record(key, "solo", b"\x03" * 32, "1.0", 7)
    with trio.fail_after(60):
        async with open_p2p(tmp_path / "a") as a:
            await a.put_name_record(rec)
            assert await a.get_name_record(rec.publisher, "solo") == rec
