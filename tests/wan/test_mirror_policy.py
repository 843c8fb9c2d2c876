"""Degraded mirrors: starved of work only while a healthy mirror can take it (issue 15's lead)."""

from __future__ import annotations

import random

import trio

from autoglm.node._mirrors import MirrorConfig, MirrorScore, MirrorSource


def test_a_degraded_lone_mirror_still_grows_when_slow_per_connection() -> None:
    s = MirrorScore(MirrorConfig(initial_connections=4, max_connections=16))
    s.on_response(0.25)  # a far origin: 250 ms to the response head
    assert s.degraded
    assert s.on_slow_connection(2e6, others_healthy=False)  # 2 MB/s per connection: more connections help
    assert s.connections == 6
    assert not s.on_slow_connection(2e6, others_healthy=True)  # a healthy mirror exists: do not feed this one
    assert s.connections == 6


def test_thresholds_are_configurable() -> None:
    s = MirrorScore(MirrorConfig(rtt_threshold=0.5, error_threshold=0.2))
    s.on_response(0.3)
    s.on_failure(0.0, random.Random(0))
    assert not s.degraded  # 300 ms and 10 % errors are within these limits
    s.on_response(2.0)  # the smoothed RTT passes 500 ms
    assert s.degraded


async def test_degraded_mirror_keeps_its_width_unless_a_ready_healthy_one_exists() -> None:
    group: list[MirrorSource] = []
    far = MirrorSource("http://127.0.0.1:9/far/", peers=group, config=MirrorConfig(initial_connections=4))
    far.score.on_response(0.3)
    assert far.max_requests() == 4  # the only mirror: full width although degraded
    near = MirrorSource("http://127.0.0.1:9/near/", peers=group, config=MirrorConfig(initial_connections=4))
    assert far.max_requests() == 1  # a healthy mirror takes the work; one probe request stays
    near.score.ready_at = trio.current_time() + 30  # the healthy one backs off (a 429 with Retry-After)
    assert far.max_requests() == 4
    near.score.ready_at = 0.0
    near.score.on_response(0.5)  # both degraded: neither is starved
    assert far.max_requests() == 4 and near.max_requests() == 4


async def test_requests_to_a_far_mirror_last_many_round_trips() -> None:
    cfg = MirrorConfig(max_request_bytes=256 << 20)
    near, far = MirrorSource("http://127.0.0.1:9/a/", config=cfg), MirrorSource("http://127.0.0.1:9/b/", config=cfg)
    for m, rtt in ((near, 0.002), (far, 0.25)):
        m.score.on_response(rtt)
        m.score.on_success(0.0, 10 << 20, 2.0)  # 5 MiB/s per connection
    assert near.max_request_bytes() == 10 << 20  # two seconds' worth
    assert far.max_request_bytes() == 50 << 20  # forty RTTs (10 s): the idle RTT and window restart amortised
    group: list[MirrorSource] = []
    probe, healthy = (MirrorSource(f"http://127.0.0.1:9/{x}/", config=cfg, peers=group) for x in "cd")
    probe.score.on_response(0.25)
    probe.score.on_success(0.0, 10 << 20, 2.0)
    assert probe.max_request_bytes() == 10 << 20  # degraded, a healthy mirror exists: a short probe, not 10 s
