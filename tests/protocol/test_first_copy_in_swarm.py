"""A piece a member advertised is in the swarm: no mirror takes it here until that promise is due.

The sequence behind most duplicate first copies at N=16 (docs/benchmarks.md,
"Duplicate first copies at N=16"): a member brings a piece in (a claim, then
a Have), its session breaks and it leaves the members after
``member_grace``; the piece's rendezvous owner, this node, found no peer
source holding it and took it from the mirror again. Now the Have keeps the
piece off the mirror until its promise is due, even after its sender left;
a liar's Haves keep nothing off it.
"""

from __future__ import annotations

from autoglm.protocol._ownership import FirstCopy

SIZE = 100
T = 20.0  # owner_timeout = deliver_timeout; unrequested_timeout = 3 T


def _fc() -> tuple[FirstCopy, int, int]:
    fc = FirstCopy("me", [SIZE] * 12, owner_timeout=T, max_scale=1.0)  # the fixed timers: exact times
    fc.set_members(["b", "c"], now=0.0)
    mine = next(i for i in range(12) if fc.owner(i) == "me")
    bs = next(i for i in range(12) if fc.owner(i) == "b")
    return fc, mine, bs


def test_own_share_advertised_by_a_member_that_left_waits_for_the_promise() -> None:
    fc, mine, _ = _fc()
    assert fc.mirror_may_take(mine, 1.0)  # our share, nobody has it: ours to bring in
    assert fc.progress("b", mine, 10.0, wanted=True)  # b brought it in (it had claimed it)
    assert not fc.mirror_may_take(mine, 11.0)  # in the swarm: from peers
    fc.set_members(["c"], now=20.0)  # b's session broke; member_grace over: b is gone
    assert not fc.mirror_may_take(mine, 25.0)  # before: True ("own share"), a second copy from the mirror
    assert not fc.mirror_may_take(mine, 10.0 + 3 * T - 0.1)
    assert 10.0 + 3 * T in fc.deadlines([mine])  # the picker is woken when it is due
    assert fc.mirror_may_take(mine, 10.0 + 3 * T)  # never delivered: the mirror's after unrequested_timeout


def test_a_request_times_the_promise_from_the_request() -> None:
    fc, mine, _ = _fc()
    fc.progress("b", mine, 10.0, wanted=True)
    fc.set_members(["c"], now=20.0)
    fc.requested(mine, 30.0)  # asked a peer (c, which got it from b)
    assert not fc.mirror_may_take(mine, 30.0 + T - 0.1)
    assert fc.mirror_may_take(mine, 30.0 + T)


def test_a_piece_that_arrives_is_forgotten() -> None:
    fc, mine, _ = _fc()
    fc.progress("b", mine, 10.0, wanted=True)
    fc.set_members(["c"], now=20.0)
    fc.piece_done(mine)
    assert fc.mirror_may_take(mine, 21.0)  # (the picker never asks for a done piece; nothing is held back)
    assert fc.deadlines([mine]) == []  # no deadline left for it


def test_a_liars_haves_hold_nothing_back() -> None:
    fc, mine, bs = _fc()
    assert fc.progress("b", bs, 1.0, wanted=True)
    fc.requested(bs, 1.0)
    assert fc.progress("b", mine, 2.0, wanted=True)
    assert not fc.mirror_may_take(mine, 1.0 + T - 0.1)
    # b never delivers its own piece: it broke a promise, so its Have of ours is no promise either
    assert fc.mirror_may_take(bs, 1.0 + T)
    assert fc.mirror_may_take(mine, 1.0 + T)


def test_a_member_that_left_after_breaking_a_promise_holds_nothing_back() -> None:
    fc, mine, bs = _fc()
    fc.progress("b", bs, 1.0, wanted=True)
    fc.requested(bs, 1.0)
    fc.progress("b", mine, 2.0, wanted=True)
    fc.set_members(["c"], now=1.0 + T)  # it leaves when its promise for bs is due
    assert fc.mirror_may_take(mine, 1.0 + T)


def test_the_first_have_counts_and_another_members_too() -> None:
    fc, mine, _ = _fc()
    fc.progress("b", mine, 10.0, wanted=True)
    fc.progress("c", mine, 40.0, wanted=True)  # c has it too, later
    fc.set_members([], now=45.0)  # both gone
    assert not fc.mirror_may_take(mine, 10.0 + 3 * T - 0.1)
    assert fc.mirror_may_take(mine, 10.0 + 3 * T)  # the first promise is the one that counts


def test_a_claim_by_a_member_that_left_waits_too() -> None:
    """The other half of the N=16 duplicates: b asked a mirror for a piece (a Claim), its session broke
    before its Have could reach us; the piece's rendezvous owner (this node) took it from the mirror again."""
    fc, mine, _ = _fc()
    fc.mirror_may_take(mine, 5.0)  # the time of the claim is the latest time any call gave
    assert fc.peer_claims("b", [mine], done=lambda i: False, requested=lambda i: False)
    assert fc.owner(mine) == "b"
    fc.set_members(["c"], now=20.0)  # b is gone: its claim no longer makes it the owner ...
    assert fc.owner(mine) == "me"
    assert not fc.mirror_may_take(mine, 25.0)  # ... but its copy is on its way (before: True, "own share")
    assert fc.mirror_may_take(mine, 5.0 + 3 * T)  # never advertised by anyone: the mirror's, the fixed timeout later


def test_a_pace_never_stretches_what_a_member_that_left_holds_back() -> None:
    later = FirstCopy("me", [SIZE] * 12)
    later.set_members(["c", "d"], now=0.0)  # the owners once b has left
    fc = FirstCopy("me", [SIZE] * 12, owner_timeout=T)  # the pace rule on (max_scale 8)
    fc.set_members(["b", "c", "d"], now=0.0)
    mine = next(i for i in range(12) if later.owner(i) == "me")
    cs = next(i for i in range(12) if fc.owner(i) == "c" and later.owner(i) == "c" and i != mine)
    assert fc.progress("c", cs, 1.0, wanted=True)  # c showed a first copy, d not yet: the pace is unknown
    fc.progress("b", mine, 2.0, wanted=True)
    fc.set_members(["c", "d"], now=3.0)
    assert fc.scale() == 8.0 and fc.owner(mine) == "me"
    assert not fc.mirror_may_take(mine, 2.0 + 3 * T - 0.1)
    assert fc.mirror_may_take(mine, 2.0 + 3 * T)  # not 8 x 60 s: nobody is left to be merely slow
