"""The peerwire server's per-connection state is bounded by the requests actually open.

Before, every Cancel was passed up whatever its id, and the node kept each id
in a set: 200,000 Cancels for ids never requested kept 16 MiB per connection.
Now a Cancel reaches the node only for a request that is open (a late Cancel,
after the answer, is dropped), and reusing an open request id is a
RemoteProtocolError.
"""

from __future__ import annotations

import pytest

from autoglm.protocol import RemoteProtocolError
from autoglm.protocol._frames import NEED_DATA
from autoglm.protocol._peerwire import (
    Cancel,
    Codec,
    PeerwireClient,
    PeerwireServer,
    Request,
    _frame,
)

MID = b"m" * 32


def _open() -> tuple[PeerwireClient, PeerwireServer]:
    cli, srv = PeerwireClient(), PeerwireServer()
    srv.receive_data(cli.auth(b"k" * 32))
    srv.next_event()
    srv.accept()
    return cli, srv


def _events(srv: PeerwireServer) -> list[object]:
    out = []
    while (ev := srv.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def test_cancels_for_ids_never_requested_are_dropped() -> None:
    _, srv = _open()
    srv.receive_data(b"".join(_frame([3, i]) for i in range(1, 200_001)))
    assert _events(srv) == []


def test_cancel_for_an_open_request_passes_once_and_late_cancels_are_dropped() -> None:
    cli, srv = _open()
    srv.receive_data(cli.request(7, MID, 1, 10) + cli.request(8, MID, 2, 10))
    assert [type(e) for e in _events(srv)] == [Request, Request]
    srv.receive_data(cli.cancel(7) + cli.cancel(7))
    assert _events(srv) == [Cancel(7)]
    srv.piece_header(8, Codec.RAW, 10)  # answered: a Cancel that crosses the answer is dropped
    srv.receive_data(_frame([3, 8]))
    assert _events(srv) == []


def test_reusing_an_open_request_id_is_a_protocol_error() -> None:
    cli, srv = _open()
    srv.receive_data(cli.request(5, MID, 1, 10))
    _events(srv)
    srv.receive_data(_frame([2, 5, MID, 2, True]))
    with pytest.raises(RemoteProtocolError, match="in flight"):
        _events(srv)


def test_an_answered_id_may_be_reused() -> None:
    cli, srv = _open()
    srv.receive_data(cli.request(5, MID, 1, 10))
    _events(srv)
    srv.reject(5, 2)  # type: ignore[arg-type]
    srv.receive_data(_frame([2, 5, MID, 2, True]))
    assert [type(e) for e in _events(srv)] == [Request]
