"""protocol/_kadlookup: the iterative Kademlia lookup as a pure state machine (time passed in)."""

from __future__ import annotations

import random
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.protocol._kadlookup import Lookup, LookupParams, key_point

P = LookupParams(alpha=3, k=8, beta=3, query_timeout=5.0, budget=15.0, max_candidates=32)


def _net(n: int, seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"p{i}": key_point(rng.randbytes(8)) for i in range(n)}


def _dist(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def _closest(net: dict[str, bytes], target: bytes, count: int) -> list[str]:
    return sorted(net, key=lambda p: _dist(net[p], target))[:count]


def _answer(net: dict[str, bytes], peer: str, target: bytes, k: int) -> list[tuple[str, bytes]]:
    # An ideal server: its k closest to the target among everyone (itself excluded).
    return [(p, net[p]) for p in _closest(net, target, k + 1) if p != peer][:k]


def _drive(lookup: Lookup, net: dict[str, bytes], target: bytes, silent: frozenset[str] = frozenset(),
           on_answer: Callable[[str], None] | None = None) -> float:
    """Run to the end, every answer 1 s after its query; silent peers never answer. Returns the end time.

    ``on_answer(peer)`` runs before each answer is reported, as the client's GET_PROVIDERS handler does.
    """
    now = 0.0
    pending: dict[str, float] = {}
    while True:
        lookup.handle_timer(now)
        if lookup.done:
            return now
        for peer in lookup.next_queries(now):
            if peer not in silent:
                pending[peer] = now + 1.0
        assert lookup.in_flight() <= lookup.params.alpha
        now = min([lookup.next_deadline(), *pending.values()])
        for peer, at in list(pending.items()):
            if at <= now:
                del pending[peer]
                if on_answer is not None:
                    on_answer(peer)
                lookup.on_response(peer, _answer(net, peer, target, lookup.params.k), now)


def test_full_walk_finds_the_true_k_closest_from_one_far_seed() -> None:
    net = _net(300)
    target = key_point(b"some key")
    far = _closest(net, target, 300)[-1]
    lookup = Lookup(target, [(far, net[far])], 0.0, P)
    lookup.need = P.k
    _drive(lookup, net, target)
    assert lookup.closest() == _closest(net, target, P.k)
    assert not lookup.timed_out
    assert lookup.queries < 40  # not the whole network


def test_beta_termination_stops_early_with_the_closest_three_answered() -> None:
    net = _net(300)
    target = key_point(b"another key")
    far = _closest(net, target, 300)[-1]
    full = Lookup(target, [(far, net[far])], 0.0, P)
    full.need = P.k
    _drive(full, net, target)
    short = Lookup(target, [(far, net[far])], 0.0, P)
    _drive(short, net, target)
    assert short.closest(3) == _closest(net, target, 3)
    assert short.queries < full.queries


def test_a_silent_peer_costs_one_slot_for_the_query_timeout() -> None:
    net = _net(50)
    target = key_point(b"k")
    seeds = _closest(net, target, 4)
    silent = frozenset(seeds[:1])
    lookup = Lookup(target, [(p, net[p]) for p in seeds], 0.0, P)
    assert lookup.next_queries(0.0) == seeds[:3]
    assert lookup.next_queries(0.0) == []  # alpha in flight
    assert lookup.next_deadline() == 5.0
    lookup.on_response(seeds[1], [], 1.0)
    lookup.on_response(seeds[2], [], 1.0)
    assert lookup.next_queries(1.0) == [seeds[3]]
    lookup.handle_timer(4.99)
    assert lookup.in_flight() == 2
    lookup.handle_timer(5.0)  # the silent peer's deadline frees its slot
    assert lookup.in_flight() == 1 and not lookup.done
    end = _drive(lookup, net, target, silent)
    assert silent.isdisjoint(lookup.closest())
    assert end < P.budget


def test_the_budget_ends_a_lookup_whose_peers_never_answer() -> None:
    net = _net(40)
    target = key_point(b"k")
    lookup = Lookup(target, list(net.items()), 0.0, P)
    end = _drive(lookup, net, target, frozenset(net))
    assert lookup.done and lookup.timed_out and lookup.closest() == []
    assert end == P.budget
    # Every failed slot was refilled: alpha new queries per query_timeout (at 0, 5 and 10 s).
    assert lookup.queries == 3 * P.alpha


def test_budget_cuts_a_slow_walk_exactly() -> None:
    net = _net(40)
    target = key_point(b"k")
    lookup = Lookup(target, list(net.items()), 0.0, LookupParams(alpha=1, k=8, query_timeout=10.0, budget=15.0))
    assert len(lookup.next_queries(0.0)) == 1
    lookup.handle_timer(14.9)
    assert not lookup.done
    lookup.handle_timer(15.0)
    assert lookup.done and lookup.timed_out and lookup.next_queries(15.0) == []


def test_a_flood_of_closer_peers_is_capped_and_self_is_never_asked() -> None:
    target = key_point(b"k")
    lookup = Lookup(target, [("seed", key_point(b"seed")), ("me", key_point(b"me"))], 0.0, P, exclude=["me"])
    assert lookup.next_queries(0.0) == ["seed"]
    flood = [(f"x{i}", key_point(b"x%d" % i)) for i in range(1000)]
    lookup.on_response("seed", [*flood, ("me", key_point(b"me")), ("bad", b"short")], 1.0)
    kept = set(lookup.known_closest(10_000))
    assert "me" not in kept and "bad" not in kept and "seed" in kept  # the answered seed is never dropped
    everyone = [*flood, ("seed", key_point(b"seed"))]
    nearest = sorted(everyone, key=lambda x: _dist(x[1], target))[: P.max_candidates]
    assert kept == {"seed", *(p for p, _ in nearest)}


def test_enough_results_end_the_walk_at_once() -> None:
    net = _net(30)
    target = key_point(b"k")
    lookup = Lookup(target, list(net.items()), 0.0, P)
    first = lookup.next_queries(0.0)
    lookup.on_response(first[0], [], 0.5)
    lookup.need = 0  # the caller has all the providers it wants
    assert lookup.done and lookup.next_queries(0.5) == []


def test_late_or_unasked_answers_are_ignored() -> None:
    net = _net(10)
    target = key_point(b"k")
    lookup = Lookup(target, list(net.items())[:2], 0.0, P)
    lookup.on_response("nobody-asked", list(net.items()), 0.0)
    assert len(lookup.known_closest()) == 2


# -- provider walks: full until a provider is found (issue #15 §2) ----------------------------------


def _provider_walk(net: dict[str, bytes], target: bytes, seeds: list[str], holders: set[str],
                   params: LookupParams = P, silent: frozenset[str] = frozenset(), enough: int = 20,
                   need: int | None = None) -> tuple[Lookup, set[str], list[str]]:
    """A GET_PROVIDERS walk as node/_kadclient.py runs it: holders answer with the provider record."""
    found: set[str] = set()
    asked: list[str] = []
    lookup = Lookup(target, [(p, net[p]) for p in seeds], 0.0, params, need=params.k if need is None else need)

    def on_answer(peer: str) -> None:
        asked.append(peer)
        if peer in holders:
            found.add("provider")
        lookup.found(len(found), enough)

    _drive(lookup, net, target, silent, on_answer)
    return lookup, found, asked


def test_a_record_beyond_the_beta_closest_is_missed_by_a_beta_walk_and_found_by_a_provider_walk() -> None:
    # The record sits on the 10th closest peer alone (its holder's table was young when it provided).
    net = _net(300)
    target = key_point(b"provided key")
    ranked = _closest(net, target, 300)
    holder = {ranked[9]}
    params = LookupParams(alpha=3, k=20, beta=3, query_timeout=5.0, budget=60.0, max_candidates=80)
    _, short_found, _ = _provider_walk(net, target, [ranked[-1]], holder, params, need=params.beta)
    assert not short_found
    lookup, found, asked = _provider_walk(net, target, [ranked[-1]], holder, params)
    assert found and ranked[9] in asked
    assert not lookup.timed_out and lookup.need == params.beta


def test_provider_walk_need_by_results() -> None:
    cases = [  # (results so far, enough) -> need after found(), from a full walk of k 8
        ((0, 20), 8),
        ((1, 20), 3),
        ((19, 20), 3),
        ((20, 20), 0),
        ((25, 20), 0),
    ]
    for (results, enough), need in cases:
        lookup = Lookup(key_point(b"k"), [], 0.0, P, need=P.k)
        lookup.found(results, enough)
        assert lookup.need == need, (results, enough)
    lookup = Lookup(key_point(b"k"), [], 0.0, P, need=P.k)
    lookup.found(1, 20)
    lookup.found(0, 20)  # need never grows back
    assert lookup.need == P.beta
    assert Lookup(key_point(b"k"), [], 0.0, P).need == P.beta  # the default: a FIND_NODE walk


def test_a_provider_walk_without_providers_asks_every_reachable_peer_of_a_small_network() -> None:
    net = _net(12)
    target = key_point(b"nobody provides this")
    params = LookupParams(alpha=3, k=20, beta=3, query_timeout=5.0, budget=60.0, max_candidates=80)
    lookup, found, asked = _provider_walk(net, target, [next(iter(net))], set(), params)
    assert not found and sorted(asked) == sorted(net)  # fewer than k: all of them answered
    assert lookup.done and not lookup.timed_out


def test_a_provider_found_early_ends_the_walk_at_the_beta_closest() -> None:
    net = _net(300)
    target = key_point(b"k")
    ranked = _closest(net, target, 300)
    seed = ranked[-1]
    params = LookupParams(alpha=3, k=20, beta=3, query_timeout=5.0, budget=60.0, max_candidates=80)
    empty, _, _ = _provider_walk(net, target, [seed], set(), params)
    early, found, _ = _provider_walk(net, target, [seed], {seed}, params)
    assert found and early.queries < empty.queries
    assert early.closest(3) == ranked[:3]  # still walked to the beta closest: they may know more holders
    lookup, _, asked = _provider_walk(net, target, [seed], {seed}, params, enough=1)
    assert asked == [seed]  # enough providers: over at once


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 120),  # network size
    st.integers(0, 2**32),  # network seed
    st.integers(0, 19),  # the holder's rank among the k closest
    st.integers(1, 4),  # seeds the walk starts from
    st.floats(0.0, 0.3),  # silent peers (never the holder)
)
def test_a_provider_walk_finds_a_record_on_any_of_the_k_closest(n: int, seed: int, rank: int, nseeds: int,
                                                                 silent_share: float) -> None:
    params = LookupParams(alpha=3, k=20, beta=3, query_timeout=5.0, budget=1000.0, max_candidates=80)
    net = _net(n, seed)
    target = key_point(b"key %d" % seed)
    rng = random.Random(seed)
    holder = _closest(net, target, params.k)[min(rank, n - 1)]
    silent = frozenset(p for p in net if p != holder and rng.random() < silent_share)
    seeds = rng.sample(sorted(net), min(nseeds, n))
    if set(seeds) <= silent:
        seeds.append(holder)
    lookup, found, asked = _provider_walk(net, target, seeds, {holder}, params, silent)
    assert found, (holder, asked)
    assert not lookup.timed_out


def test_a_peer_that_only_timed_out_is_asked_once_more_when_nobody_new_is_left() -> None:
    # A young node knows one peer, which is slow (live, but its first answer came after 5 s).
    target = key_point(b"k")
    lookup = Lookup(target, [("slow", key_point(b"slow"))], 0.0, P, need=P.k)
    assert lookup.next_queries(0.0) == ["slow"]
    lookup.handle_timer(5.0)
    assert not lookup.done
    assert lookup.next_queries(5.0) == ["slow"]  # asked again: the budget has 10 s left
    lookup.on_response("slow", [("other", key_point(b"other"))], 6.0)
    assert lookup.closest() == ["slow"] and lookup.next_queries(6.0) == ["other"]
    lookup.handle_timer(11.0)  # "other" ran out of time: asked again too
    assert lookup.next_queries(11.0) == ["other"]
    lookup.handle_timer(15.0)
    assert lookup.done and lookup.timed_out


def test_a_second_timeout_or_an_outright_failure_is_final() -> None:
    target = key_point(b"k")
    lookup = Lookup(target, [("slow", key_point(b"slow")), ("dead", key_point(b"dead"))], 0.0,
                    LookupParams(alpha=3, k=8, beta=3, query_timeout=5.0, budget=60.0, max_candidates=32))
    assert sorted(lookup.next_queries(0.0)) == ["dead", "slow"]
    lookup.on_failure("dead", 0.1)  # refused: not asked again
    lookup.handle_timer(5.0)
    assert lookup.next_queries(5.0) == ["slow"]
    lookup.handle_timer(10.0)
    assert lookup.next_queries(10.0) == [] and lookup.done and not lookup.timed_out


def test_new_peers_go_before_a_retry() -> None:
    net = _net(30)
    target = key_point(b"k")
    seeds = _closest(net, target, 4)
    lookup = Lookup(target, [(p, net[p]) for p in seeds], 0.0, P, need=P.k)
    assert len(lookup.next_queries(0.0)) == 3
    lookup.handle_timer(5.0)  # all three ran out of time; the 4th seed is new
    assert lookup.next_queries(5.0)[0] == seeds[3]
