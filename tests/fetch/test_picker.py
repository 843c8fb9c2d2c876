"""Table-driven tests for the pure piece picker (libtorrent setup_picker style).

``availability`` strings give, per piece, how many peers hold it ("2223333":
peer p0 and p1 hold every piece, p2 holds pieces 3-6). ``have`` strings mark
pieces already DONE with "1".
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.protocol._ownership import FirstCopy
from autoglm.protocol._picker import LOCAL, MIRROR, PEER, PiecePicker, PieceState

SIZE = 100


def setup_picker(
    availability: str,
    have: str = "",
    *,
    file_starts: tuple[int, ...] = (0,),
    budget: int | None = None,
) -> PiecePicker:
    n = len(availability)
    have = have or "0" * n
    pp = PiecePicker(
        [SIZE] * n,
        file_starts,
        have=[i for i, c in enumerate(have) if c == "1"],
        mirror_overlap_budget=budget,
    )
    peers = max((int(c) for c in availability), default=0)
    for p in range(peers):
        pp.add_source(f"p{p}", PEER, [i for i, c in enumerate(availability) if int(c) > p])
    pp.check_invariant()
    return pp


def states(pp: PiecePicker) -> str:
    return "".join("nrwd"[pp.state(i)] for i in range(pp.piece_count))


@pytest.mark.parametrize(
    ("availability", "have", "expected"),
    [
        ("2223333", "", [0, 1, 2, 3, 4, 5, 6]),  # rarest first, ties by index
        ("3332111", "", [4, 5, 6, 3, 0, 1, 2]),
        ("3332111", "0000100", [5, 6, 3, 0, 1, 2]),  # pieces we have are skipped
        ("1111111", "1111111", []),
    ],
)
def test_rarest_first_order(availability: str, have: str, expected: list[int]) -> None:
    pp = setup_picker(availability, have)
    pp.add_source("new", PEER, range(len(availability)))
    got = []
    while True:
        picked = pp.pick("new", SIZE, now=0.0)
        if not picked:
            break
        got += picked
        pp.check_invariant()
    assert got == expected


@pytest.mark.parametrize(
    ("availability", "file_starts", "max_bytes", "runs"),
    [
        ("0000000", (0,), 300, [[0, 1, 2], [3, 4, 5], [6]]),
        ("0000000", (0, 2, 5), 1000, [[0, 1], [2, 3, 4], [5, 6]]),  # runs never cross files
        ("0010100", (0,), 1000, [[0, 1], [3], [5, 6]]),  # pieces peers hold are skipped
        ("1111111", (0,), 1000, []),  # budget 0: everything comes from peers
        ("0000000", (0,), 50, [[0], [1], [2], [3], [4], [5], [6]]),  # at least one piece
    ],
)
def test_mirror_runs(availability: str, file_starts: tuple[int, ...], max_bytes: int, runs: list[list[int]]) -> None:
    pp = setup_picker(availability, file_starts=file_starts, budget=0)
    pp.add_source("m", MIRROR)
    got = []
    for _ in range(20):
        run = pp.pick("m", max_bytes, now=0.0)
        if not run:
            break
        got.append(run)
        pp.check_invariant()
    # Once no free piece is left, endgame may duplicate pieces peers do not hold.
    assert got[: len(runs)] == runs


def test_mirror_overlap_budget() -> None:
    pp = setup_picker("1111", budget=2)
    pp.add_source("m", MIRROR)
    assert pp.pick("m", 1000, 0.0) == [0, 1]
    assert pp.pick("m", 1000, 0.0) == []
    pp.check_invariant()


def test_peers_before_mirror_unlimited_budget() -> None:
    pp = setup_picker("1100")
    pp.add_source("m", MIRROR)
    assert pp.pick("m", 1000, 0.0) == [2, 3]  # first what no peer has
    assert pp.pick("m", 1000, 0.0) == [0, 1]  # then, with no budget limit, the rest


@pytest.mark.parametrize(
    ("ops", "expected_states"),
    [
        ("pick p0; written p0 0", "wnnn"),
        ("pick p0; written p0 0; done 0", "dnnn"),
        ("pick p0; fail p0 0", "nnnn"),
        ("pick p0; written p0 0; lost 0", "nnnn"),
        ("pick p0; pick p0; done 0; done 1; lost 1", "dnnn"),
    ],
)
def test_state_transitions(ops: str, expected_states: str) -> None:
    pp = setup_picker("1111")
    for op in ops.split("; "):
        verb, *args = op.split()
        if verb == "pick":
            pp.pick(args[0], SIZE, 0.0)
        elif verb == "written":
            pp.piece_written(args[0], int(args[1]))
        elif verb == "done":
            pp.piece_done(int(args[0]))
        elif verb == "fail":
            pp.piece_failed(args[0], int(args[1]), integrity=False)
        elif verb == "lost":
            pp.piece_lost(int(args[0]))
        pp.check_invariant()
    assert states(pp) == expected_states


def test_integrity_failure_never_asks_same_source_again() -> None:
    pp = setup_picker("0")
    pp.add_source("m1", MIRROR)
    pp.add_source("m2", MIRROR)
    assert pp.pick("m1", SIZE, 0.0) == [0]
    pp.piece_failed("m1", 0, integrity=True)
    assert pp.pick("m1", SIZE, 1.0) == []
    assert pp.pick("m2", SIZE, 1.0) == [0]
    pp.piece_failed("m2", 0, integrity=False)
    assert pp.pick("m1", SIZE, 2.0) == []
    assert pp.pick("m2", SIZE, 2.0) == [0]
    assert pp.can_serve_missing()
    pp.check_invariant()


def test_no_source_left() -> None:
    pp = setup_picker("0")
    pp.add_source("m", MIRROR)
    pp.pick("m", SIZE, 0.0)
    pp.piece_failed("m", 0, integrity=True)
    assert not pp.can_serve_missing()


def test_endgame_duplicates_oldest_request_once() -> None:
    pp = setup_picker("000")
    pp.add_source("a", MIRROR)
    pp.add_source("b", MIRROR)
    pp.add_source("c", MIRROR)
    assert pp.pick("a", SIZE, now=1.0) == [0]
    assert pp.pick("a", 2 * SIZE, now=2.0) == [1, 2]
    # Nothing free: b duplicates the oldest request, c the next oldest, then
    # every piece has reached two requesters.
    assert pp.pick("b", SIZE, now=3.0) == [0]
    assert pp.pick("c", SIZE, now=3.0) == [1]
    assert pp.pick("c", SIZE, now=3.0) == [2]
    pp.add_source("d", MIRROR)
    assert pp.pick("d", SIZE, now=3.0) == []
    assert pp.piece_written("b", 0) == frozenset({"a"})
    assert pp.state(0) == PieceState.WRITING
    pp.check_invariant()


def test_have_and_bitfield_update_counts() -> None:
    pp = setup_picker("1000")
    pp.source_have("p0", 3)
    assert pp.peer_count(3) == 1
    pp.source_bitfield("p0", [1, 2])
    assert [pp.peer_count(i) for i in range(4)] == [0, 1, 1, 0]
    pp.check_invariant()


def test_remove_source_releases_pieces() -> None:
    pp = setup_picker("22")
    pp.pick("p0", SIZE, 0.0)
    assert pp.remove_source("p0") == [0]
    assert states(pp) == "nn"
    assert pp.peer_count(0) == 1
    pp.check_invariant()


def test_wanted_subset_and_local() -> None:
    pp = PiecePicker([SIZE] * 4, wanted=[1, 2])
    pp.add_source("disk", LOCAL, [0, 1])
    assert pp.remaining == 2
    assert pp.pick("disk", 10 * SIZE, 0.0) == [1]
    pp.piece_written("disk", 1)
    pp.piece_done(1)
    assert pp.remaining == 1
    pp.check_invariant()


# -- random operation sequences keep the bookkeeping consistent ----------------

_SOURCES = ["m0", "m1", "p0", "p1"]
_op = st.tuples(
    st.sampled_from(["pick", "written", "done", "fail", "bad", "lost", "have", "bitfield", "remove", "add", "take"]),
    st.sampled_from(_SOURCES),
    st.integers(0, 7),
    st.integers(1, 400),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=60))
def test_random_operations_keep_invariant(ops: list[tuple[str, str, int, int]]) -> None:
    pp = PiecePicker([SIZE] * 8, (0, 5), mirror_overlap_budget=3)
    present: set[str] = set()

    def add(sid: str) -> None:
        pp.add_source(sid, MIRROR if sid.startswith("m") else PEER, None if sid.startswith("m") else {0, 1, 2})
        present.add(sid)

    for sid in _SOURCES:
        add(sid)
    t = 0.0
    for verb, sid, i, nbytes in ops:
        t += 1.0
        if verb == "add":
            if sid not in present:
                add(sid)
            continue
        if sid not in present:
            continue
        if verb == "pick":
            got = pp.pick(sid, nbytes, t)
            assert all(pp.state(j) == PieceState.REQUESTED for j in got)
            assert all(j not in pp.failed_pieces(sid) for j in got)
        elif verb == "written" and i in pp.in_flight(sid):
            pp.piece_written(sid, i)
        elif verb == "done" and pp.state(i) == PieceState.WRITING:
            pp.piece_done(i)
        elif verb in ("fail", "bad") and i in pp.in_flight(sid):
            pp.piece_failed(sid, i, integrity=verb == "bad")
        elif verb == "lost":
            pp.piece_lost(i)
        elif verb == "have":
            pp.source_have(sid, i)
        elif verb == "bitfield" and sid.startswith("p"):
            pp.source_bitfield(sid, range(i))
        elif verb == "remove":
            pp.remove_source(sid)
            present.discard(sid)
        elif verb == "take":
            pp.take(sid, i, t)
        pp.check_invariant()


# -- first-copy spreading (rule 6) ------------------------------------------


def spread_picker(n: int, me: str = "me", peers: tuple[str, ...] = ("a", "b", "c"), timeout: float = 10.0) -> PiecePicker:
    # The fixed timers (no pace scaling, protocol/_ownership.py FirstCopy.scale): these tests check exact times.
    pp = PiecePicker([SIZE] * n, mirror_overlap_budget=0, first_copy=FirstCopy(me, [SIZE] * n, timeout, max_scale=1.0))
    assert set_swarm(pp, peers, now=0.0) == bool(peers)
    pp.add_source("m", MIRROR)
    return pp


# The first-copy calls node/_engine.py's Fetch makes on the FirstCopy it gives the picker.
def _fc(pp: PiecePicker) -> FirstCopy:
    assert pp.first_copy is not None
    return pp.first_copy


def owner(pp: PiecePicker, i: int) -> str:
    return _fc(pp).owner(i)


def set_swarm(pp: PiecePicker, peers: tuple[str, ...], now: float, complete: tuple[str, ...] = ()) -> bool:
    return _fc(pp).set_members([*peers, *complete], now)


def peer_claims(pp: PiecePicker, peer: str, indices: Iterable[int]) -> bool:
    return _fc(pp).peer_claims(peer, indices, done=pp.done, requested=pp.taken)


def my_claims(pp: PiecePicker) -> list[int]:
    return _fc(pp).my_claims(pp.done)


def peer_progress(pp: PiecePicker, peer: str, i: int, now: float) -> bool:
    return _fc(pp).progress(peer, i, now, wanted=pp.wants(i))


def drain_mirror(pp: PiecePicker, now: float) -> list[int]:
    got: list[int] = []
    while picked := pp.pick("m", SIZE, now):
        got += picked
        pp.check_invariant()
    return got


def test_rendezvous_partitions_the_first_copy() -> None:
    """Four nodes that see the same swarm agree on one owner per piece and split the mirror work."""
    nodes = ("n0", "n1", "n2", "n3")
    taken: list[int] = []
    for me in nodes:
        pp = spread_picker(64, me, tuple(p for p in nodes if p != me))
        got = drain_mirror(pp, now=0.0)
        assert sorted(got) == [i for i in range(64) if owner(pp, i) == me]
        assert len(got) == 64 // 4  # bounded loads: an even share each
        taken += got
    assert sorted(taken) == list(range(64))  # every piece exactly once: one copy through the mirror


@pytest.mark.parametrize(
    ("availability", "expected"),
    [
        ("0000000000000000", "owned"),  # nobody has anything: only our own share
        ("1111111111111111", ""),  # peers have it all: the mirror takes nothing
    ],
)
def test_spreading_still_prefers_peers(availability: str, expected: str) -> None:
    pp = spread_picker(len(availability))
    pp.add_source("p0", PEER, [i for i, c in enumerate(availability) if c == "1"])
    got = drain_mirror(pp, now=0.0)
    assert sorted(got) == ([i for i in range(len(availability)) if owner(pp, i) == "me"] if expected else [])


def test_stale_owner_goes_back_to_source() -> None:
    pp = spread_picker(32, timeout=10.0)
    mine = drain_mirror(pp, now=0.0)
    assert pp.next_deadline() == 10.0
    assert drain_mirror(pp, now=9.9) == []  # owners still in time: wait for them
    peer_progress(pp, "a", next(i for i in range(32) if owner(pp, i) == "a"), 9.0)  # a new HAVE keeps a's pieces a's
    owners = [owner(pp, i) for i in range(32)]  # asking a mirror for a piece makes it ours
    late = drain_mirror(pp, now=10.0)
    assert late and all(owners[i] in ("b", "c") for i in late)
    assert all(owner(pp, i) == "me" for i in late)
    assert not set(late) & set(mine)
    assert pp.next_deadline() == 19.0
    assert {owners[i] for i in drain_mirror(pp, now=19.0)} == {"a"}


def test_departed_owner_share_moves_mostly_only_its_share() -> None:
    pp = spread_picker(48)
    before = [owner(pp, i) for i in range(48)]
    assert set_swarm(pp, ("a", "b"), now=1.0)  # c left
    after = [owner(pp, i) for i in range(48)]
    moved = sum(x != y for x, y in zip(before, after, strict=True) if x != "c")
    assert moved <= 48 // 4  # stable enough that in-flight work mostly stays put
    assert "c" not in after and {after.count(p) for p in ("me", "a", "b")} == {16}
    assert not set_swarm(pp, ("a", "b"), now=2.0)


def test_lone_node_owns_everything() -> None:
    pp = spread_picker(5, peers=())
    assert sorted(drain_mirror(pp, now=0.0)) == [0, 1, 2, 3, 4]
    assert pp.next_deadline() is None


def test_endgame_mirror_duplicates_only_pickable_pieces() -> None:
    pp = spread_picker(8)
    mine = drain_mirror(pp, now=0.0)
    pp.add_source("m2", MIRROR)
    dup = pp.pick("m2", SIZE, now=0.0)
    # Not endgame (others' pieces are still NONE): a second mirror takes nothing it may not take.
    assert dup == [] or owner(pp, dup[0]) == "me"
    assert set(dup) <= set(mine) or not dup


def test_complete_peer_keeps_its_share_until_it_goes_stale() -> None:
    """A peer that holds everything keeps its share (it comes from peers), unless it never serves us."""
    pp = spread_picker(32, timeout=10.0)
    mine = drain_mirror(pp, now=0.0)
    assert not set_swarm(pp, ("a", "b"), now=1.0, complete=("c",))  # c finished: same owners
    assert drain_mirror(pp, now=9.0) == []
    for k, p in enumerate(("a", "b")):
        peer_progress(pp, p, k, 50.0)
    owners = [owner(pp, i) for i in range(32)]
    late = drain_mirror(pp, now=55.0)  # c sent no Have and did not unchoke us (no source): stale
    assert late and {owners[i] for i in late} == {"c"}
    assert not set(late) & set(mine)


# -- claims: a peer that asked a mirror for a piece owns it ------------------


def test_a_claimed_piece_is_left_to_its_claimer() -> None:
    pp = spread_picker(16)
    ours = [i for i in range(16) if owner(pp, i) == "me"]
    assert peer_claims(pp, "a", ours[:2] + [99, -1])  # out of range: ignored
    assert not peer_claims(pp, "a", ours[:2])  # nothing new
    assert not peer_claims(pp, "stranger", ours[2:])  # not a member: ignored
    got = drain_mirror(pp, now=0.0)
    assert got == ours[2:] and owner(pp, ours[0]) == "a"
    assert my_claims(pp) == ours[2:]  # what we asked a mirror for, for members that come later


def test_claims_survive_a_new_member_and_leave_with_their_peer() -> None:
    """A late member does not move what is already asked of a mirror; a departed claimer's pieces go back."""
    pp = spread_picker(24, peers=("a", "b"))
    mine = pp.pick("m", SIZE, now=0.0)
    a_piece = next(i for i in range(24) if owner(pp, i) == "b")
    peer_claims(pp, "a", [a_piece])
    assert set_swarm(pp, ("a", "b", "late"), now=1.0)
    assert owner(pp, mine[0]) == "me" and owner(pp, a_piece) == "a"
    set_swarm(pp, ("b", "late"), now=2.0)  # a left
    assert owner(pp, a_piece) != "a"


@pytest.mark.parametrize(("peer", "keeps"), [("zz", "me"), ("aa", "aa")])
def test_both_asked_a_mirror_the_smaller_id_keeps_the_piece(peer: str, keeps: str) -> None:
    pp = spread_picker(8, peers=("aa", "zz"))
    [p] = pp.pick("m", SIZE, now=0.0)[:1]
    peer_claims(pp, peer, [p])
    assert owner(pp, p) == keeps  # the peer applies the same rule with the roles swapped


def test_a_stale_claimer_loses_its_claims() -> None:
    pp = spread_picker(16, timeout=10.0)
    theirs = [i for i in range(16) if owner(pp, i) == "me"][:3]
    peer_claims(pp, "a", theirs)
    peer_progress(pp, "b", 0, 10.0)
    peer_progress(pp, "c", 1, 10.0)
    assert not set(drain_mirror(pp, now=5.0)) & set(theirs)
    assert set(theirs) <= set(drain_mirror(pp, now=10.0))  # a sent no Have for owner_timeout


def test_claims_per_peer_are_capped() -> None:
    from autoglm.protocol._picker import MAX_PEER_CLAIMS

    n = MAX_PEER_CLAIMS + 40
    pp = spread_picker(n)
    before = [owner(pp, i) for i in range(n)]
    peer_claims(pp, "a", range(n))
    assert all(owner(pp, i) == "a" for i in range(MAX_PEER_CLAIMS))
    assert [owner(pp, i) for i in range(MAX_PEER_CLAIMS, n)] == before[MAX_PEER_CLAIMS:]  # the rest ignored


def test_nodes_alone_start_on_different_pieces() -> None:
    """Before they know of each other, each node starts with the pieces it most likely owns later."""
    nodes = [f"n{i}" for i in range(8)]
    firsts = []
    for me in nodes:
        pp = spread_picker(128, me, peers=())
        firsts.append(set(pp.pick("m", SIZE, now=0.0) + pp.pick("m", SIZE, now=0.0)))
    assert len(set().union(*firsts)) >= 12  # of 16 requests (index order: all on pieces 0 and 1)
    together = spread_picker(128, "n0", tuple(nodes[1:]))
    assert sum(owner(together, i) == "n0" for i in firsts[0]) >= 1  # and mostly pieces n0 keeps


def test_endgame_duplicate_waits_for_endgame_delay() -> None:
    pp = PiecePicker([SIZE] * 2, endgame_delay=1.0)
    for sid in ("a", "b"):
        pp.add_source(sid, PEER, [0, 1])
    assert pp.pick("a", 2 * SIZE, now=10.0) == [0, 1]
    assert pp.pick("b", SIZE, now=10.5) == []  # too young to duplicate
    assert pp.next_deadline() == 11.0  # the engine knows when to look again
    assert pp.pick("b", SIZE, now=11.0) == [0]
    pp.check_invariant()


def test_small_pieces_go_first_when_spreading() -> None:
    """Config and tokenizer files take one round trip each: never left for the end."""
    sizes = [8 << 20] * 6 + [77, 58]
    pp = PiecePicker(sizes, [0, 6, 7], mirror_overlap_budget=0, first_copy=FirstCopy("me", sizes))
    pp.add_source("m", MIRROR)
    first = pp.pick("m", 1, now=0.0) + pp.pick("m", 1, now=0.0)
    assert sorted(first) == [6, 7]


def test_our_claims_outlive_membership_changes() -> None:
    """What we asked a mirror for stays ours when the swarm changes (the others were told it is)."""
    pp = spread_picker(32)
    mine = pp.pick("m", SIZE, now=0.0)
    for peers in (("a", "b", "c", "d"), ("a",), ("a", "b", "c")):
        set_swarm(pp, peers, now=1.0)
        assert owner(pp, mine[0]) == "me"
        assert mine[0] in my_claims(pp)
