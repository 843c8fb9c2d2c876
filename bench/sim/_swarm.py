"""Simulated nodes that run the real swarm policies (docs/simulation.md).

What is real here (imported, not re-implemented): the piece picker and its
first-copy ownership and claims (``autoglm.protocol._picker``,
``._ownership``), the membership rule with its grace for departed peers
(``._membership``), the choker (``._choking``), and the control messages
(``._control``: Have, Claim, Interested, NotInterested, Choke, Unchoke go
through ``encode_control``/``decode_control`` when ``wire`` is on). The
defaults come from the node's own settings classes (``SwarmConfig``,
``FetchOptions``, ``MirrorConfig``).

What is modelled: the engine's scheduling loop (node/_engine.py
``_schedule``: sources in order peers then mirror, round robin, up to each
source's request limit), the mirror's request size and the swarm's share of
mirror connections (``_max_requests``/``_request_bytes``), a peer's pipeline
depth (node/swarm/session.py ``pipeline_depth``), sessions (who is
connected to whom), and bytes on links (bench/sim/_flows.py).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from autoglm.node._engine import FetchOptions
from autoglm.node._mirrors import FIRST_REQUEST_BYTES, MirrorConfig
from autoglm.node.swarm.config import SwarmConfig
from autoglm.protocol._choking import choose_unchoked
from autoglm.protocol._control import (
    Choke,
    Claim,
    ControlMessage,
    Have,
    Interested,
    NotInterested,
    Unchoke,
    decode_control,
    encode_control,
)
from autoglm.protocol._frames import FRAME_HEADER
from autoglm.protocol._membership import membership
from autoglm.protocol._ownership import FirstCopy
from autoglm.protocol._picker import MIRROR, PEER, PiecePicker, PieceState

from ._flows import Flow, Host, Link, Loop, Net

__all__ = ["Params", "SimNode", "Swarm"]

MID = bytes(32)  # the one manifest every node fetches
MIRROR_ID = "mirror"
_SWARM = SwarmConfig()
_FETCH = FetchOptions()
_MIRROR = MirrorConfig()


@dataclass(frozen=True, slots=True)
class Params:
    """Timing and policy knobs; defaults are the node's own (join uses endgame_delay=1.0, overlap budget 0)."""

    latency: float = 0.0002  # one-way, node to node (s)
    origin_rtt: float = 0.0004  # request to first byte at the origin (s)
    start_delay: float = 0.0  # arrival to fetch start (discovery, membership settle)
    upload_slots: int = _SWARM.upload_slots
    rechoke_interval: float = _SWARM.rechoke_interval
    member_grace: float = _SWARM.member_grace
    pipeline: int = _SWARM.pipeline
    owner_timeout: float = _FETCH.owner_timeout
    endgame_copies: int = _FETCH.endgame_copies
    endgame_delay: float = 1.0  # node/_swarm_node.py: hold() sets 1.0
    swarm_mirror_connections: int = _FETCH.swarm_mirror_connections
    mirror_connections: int = _MIRROR.max_connections
    max_request_bytes: int = _MIRROR.max_request_bytes
    first_request_bytes: int = FIRST_REQUEST_BYTES
    wire: bool = True  # control messages through the real codec
    # A Have wakes the fetch's scheduler at most once per tick (the engine's task also runs once per
    # wake-up, however many Haves arrived meanwhile); the scheduler is the simulator's main cost.
    sched_tick: float = 0.005
    # What-if only (not the node's behaviour): FirstCopy's deliver_timeout, which the picker leaves
    # equal to owner_timeout. None: the real default.
    deliver_timeout: float | None = None
    # What-if: FirstCopy's max_scale (1.0: the fixed 20 s timers of before; None: the node's default)
    # and pace_factor (None: the default).
    max_scale: float | None = None
    pace_factor: float | None = None
    # The swarm-wide fetcher set (node/swarm/fetches.py ``relayed``: fetchers learned by peer exchange
    # with no session here): a node that arrives is known to every node this many seconds later, one
    # that leaves is forgotten after ``member_grace``. None: first-copy members are the sessions only.
    gossip: float | None = None
    # What-if (not the node's behaviour): a Choke lets the piece already on its way finish instead of
    # dropping its bytes (the node ends every request to that peer: stop_using -> remove_source).
    finish_on_choke: bool = False


# node/swarm/session.py PeerSource: QUEUE_TIME seconds of throughput in flight, within [MIN_DEPTH, MAX_DEPTH].
QUEUE_TIME, MIN_DEPTH, MAX_DEPTH = 1.0, 2, 32


@dataclass(slots=True)
class _Req:
    sid: str
    indices: list[int]
    sent: float
    pos: int = 0
    flow: Flow | None = None
    dead: bool = False
    bytes: int = 0


@dataclass(slots=True)
class Stats:
    messages: dict[str, int] = field(default_factory=dict)
    withdrawn_runs: int = 0
    duplicate_bytes: int = 0  # piece bytes that arrived after the piece was already here
    # Why each piece asked of the origin was the mirror's to take (see SimNode._why_mirror).
    mirror_why: dict[str, int] = field(default_factory=dict)


class Swarm:
    """The origin, the nodes, and the links between them."""

    def __init__(self, sizes: Sequence[int], file_starts: Sequence[int], origin_cap: float, params: Params, seed: int) -> None:
        self.sizes = list(sizes)
        self.file_starts = list(file_starts)
        self.total = sum(sizes)
        self.params = params
        self.loop = Loop()
        self.net = Net(self.loop)
        self.origin = Link("origin/up", origin_cap)
        self.nodes: dict[str, SimNode] = {}
        self.rng = random.Random(seed)
        self.stats = Stats()
        self.known: dict[str, None] = {}  # fetchers gossiped to every node (Params.gossip)
        self._round = False

    def add_node(self, nid: str, up: float, down: float, arrive: float, host: Host | None = None) -> SimNode:
        node = SimNode(self, nid, up, down, host)
        self.nodes[nid] = node
        self.loop.at(arrive, node.arrive)
        return node

    def learn(self, nid: str) -> None:
        """Gossip: ``nid`` (arrived) is now known to every node."""
        if self.nodes[nid].alive:
            self.known[nid] = None
            self._gossip_round()

    def forget(self, nid: str) -> None:
        """Gossip: ``nid`` (left) is forgotten, its grace over."""
        if not self.nodes[nid].alive:
            self.known.pop(nid, None)
            self._gossip_round()

    def _gossip_round(self) -> None:
        if not self._round:
            self._round = True
            self.loop.at(self.loop.now + self.params.sched_tick, self._regossip)

    def _regossip(self) -> None:
        self._round = False
        for node in self.nodes.values():
            if node.alive and node.fetching:
                node.update_membership()

    def connect(self, a: str, b: str) -> None:
        """A session-capable pair (the session opens when both are running)."""
        self.nodes[a].neighbours[b] = None
        self.nodes[b].neighbours[a] = None

    def send(self, src: SimNode, dst_id: str, msg: ControlMessage | tuple[Any, ...]) -> None:
        """A control message (through the real codec when ``wire``), or a simulator note (a tuple)."""
        name = type(msg).__name__ if not isinstance(msg, tuple) else msg[0]
        self.stats.messages[name] = self.stats.messages.get(name, 0) + 1
        if self.params.wire and not isinstance(msg, tuple):
            msg = decode_control(encode_control(msg)[FRAME_HEADER:])
        self.loop.at(self.loop.now + self.params.latency, self._deliver, src.id, dst_id, msg)

    def broadcast_have(self, src: SimNode, index: int) -> None:
        """One Have to every peer in session, all arriving one latency later (one event, many deliveries)."""
        msg: ControlMessage = Have(MID, index)
        n = len(src.peers)
        self.stats.messages["Have"] = self.stats.messages.get("Have", 0) + n
        if self.params.wire:
            msg = decode_control(encode_control(msg)[FRAME_HEADER:])
        self.loop.at(self.loop.now + self.params.latency, self._deliver_many, src.id, list(src.peers), msg)

    def _deliver(self, src_id: str, dst_id: str, msg: object) -> None:
        dst = self.nodes.get(dst_id)
        if dst is not None and dst.alive and (src_id in dst.peers or isinstance(msg, tuple)):
            dst.receive(src_id, msg)

    def _deliver_many(self, src_id: str, dsts: list[str], msg: object) -> None:
        for d in dsts:
            self._deliver(src_id, d, msg)

    def origin_bytes(self) -> float:
        return self.origin.bytes + sum(f.rate * (self.loop.now - f.t) for f in self.origin.flows)


class SimNode:
    """One node: its fetch (the real PiecePicker) and its uploads (the real choker)."""

    def __init__(self, sw: Swarm, nid: str, up: float, down: float, host: Host | None) -> None:
        self.sw = sw
        self.id = nid
        self.up = Link(f"{nid}/up", up)
        self.down = Link(f"{nid}/down", down, host)
        self.neighbours: dict[str, None] = {}
        self.alive = False
        self.left_at: float | None = None
        self.arrived_at: float | None = None
        self.complete_at: float | None = None
        self.fetching = False
        self.peers: dict[str, None] = {}  # in session and announced the manifest (insertion order)
        self.have_of: dict[str, set[int]] = {}
        self.departed: dict[str, tuple[float, bool]] = {}
        self.have: set[int] = set()
        self.picker: PiecePicker | None = None
        self.first_copy: FirstCopy | None = None
        # uploading
        self.interested: set[str] = set()
        self.unchoked: set[str] = set()
        self.served: dict[str, int] = {}
        self.uploads: dict[Flow, None] = {}
        # downloading
        self.unchoking_us: set[str] = set()
        self.reqs: dict[int, _Req] = {}
        self.by_piece: dict[int, set[int]] = {}
        self.active: dict[str, int] = {}
        self._draining: set[str] = set()  # choked sources whose piece on its way may finish (finish_on_choke)
        self._rid = 0
        self._rate: dict[str, tuple[float, float]] = {}  # peer source -> (rate EWMA, last arrival)
        self._mirror_tput: float | None = None
        self.fetchers = 1
        self._wake_at: float | None = None
        self._poked = False
        self._missing: int | None = None  # bytes of NONE pieces, within one schedule() pass
        self.from_origin = 0

    # -- life cycle ------------------------------------------------------------
    def arrive(self) -> None:
        self.alive = True
        self.arrived_at = self.sw.loop.now
        # Sessions are warm (the benchmark meshes its daemons first): the
        # Announce goes out on arrival, the fetch starts ``start_delay`` later.
        for nb in self.neighbours:
            if self.sw.nodes[nb].alive:
                self.sw.send(self, nb, ("hello", frozenset(self.have)))
        self.sw.loop.at(self.sw.loop.now + self.sw.params.start_delay, self.start)
        if self.sw.params.gossip is not None:
            self.sw.loop.at(self.sw.loop.now + self.sw.params.gossip, self.sw.learn, self.id)
        self.sw.loop.at(self.sw.loop.now + self.sw.rng.uniform(0, self.sw.params.rechoke_interval), self._rechoke_tick)

    def start(self) -> None:
        if not self.alive:
            return
        sw = self.sw
        p = sw.params
        kw: dict[str, float] = {}  # what-ifs (None: the node's default)
        if p.max_scale is not None:
            kw["max_scale"] = p.max_scale
        if p.pace_factor is not None:
            kw["pace_factor"] = p.pace_factor
        self.first_copy = FirstCopy(self.id, sw.sizes, p.owner_timeout, p.deliver_timeout, **kw)
        self.picker = PiecePicker(
            sw.sizes, sw.file_starts, endgame_copies=p.endgame_copies, mirror_overlap_budget=0,
            first_copy=self.first_copy, endgame_delay=p.endgame_delay,
        )
        self.picker.add_source(MIRROR_ID, MIRROR)
        self.picker.progress = self._progress  # node/_engine.py: Delivery.written
        self.fetching = True
        for peer in sorted(self.peers):
            sw.send(self, peer, Interested(MID))
        self.update_membership()

    def leave(self) -> None:
        """Churn: the process ends; its flows stop, its peers see the sessions end."""
        self.alive = False
        self.fetching = False
        self.left_at = self.sw.loop.now
        net = self.sw.net
        for f in [*self.up.flows, *self.down.flows]:
            net.abort(f)
        for p in self.peers:
            self.sw.send(self, p, ("bye", self.complete_at is not None))
        self.peers.clear()
        if self.sw.params.gossip is not None:
            self.sw.loop.at(self.sw.loop.now + self.sw.params.member_grace, self.sw.forget, self.id)

    # -- messages ----------------------------------------------------------------
    def receive(self, src: str, msg: object) -> None:
        if isinstance(msg, tuple):
            if msg[0] == "hello":
                self._hello(src, msg[1], reply=msg[0] == "hello")
            elif msg[0] == "hello-reply":
                self._hello(src, msg[1], reply=False)
            elif msg[0] == "bye":
                self._bye(src, msg[1])
            elif msg[0] == "request":
                self._serve(src, msg[1], msg[2])
            elif msg[0] == "refused":
                self._refused(src, msg[1])
            return
        if isinstance(msg, Have):
            self._have(src, msg.index)
        elif isinstance(msg, Claim):
            pk, fc = self.picker, self.first_copy
            if pk is not None and fc is not None and self.fetching and fc.peer_claims(src, msg.indices, done=pk.done, requested=pk.taken):
                self._withdraw_not_ours()
                self.schedule()
        elif isinstance(msg, Interested):
            self.interested.add(src)
            self.rechoke()
        elif isinstance(msg, NotInterested):
            self.interested.discard(src)
            self.rechoke()
        elif isinstance(msg, Unchoke):
            self.unchoking_us.add(src)
            self._draining.discard(f"peer:{src}")
            self._attach(src)
            self.schedule()
        elif isinstance(msg, Choke):
            self.unchoking_us.discard(src)
            if self.sw.params.finish_on_choke:
                self._drain(src)
            else:
                self._detach(src)
            self.schedule()

    def _hello(self, src: str, have: frozenset[int], reply: bool) -> None:
        new = src not in self.peers
        self.peers[src] = None
        self.departed.pop(src, None)
        self.have_of[src] = set(have)
        if reply:
            self.sw.send(self, src, ("hello-reply", frozenset(self.have)))
        if new and self.fetching:
            self.sw.send(self, src, Interested(MID))
            assert self.picker is not None and self.first_copy is not None
            mine = self.first_copy.my_claims(self.picker.done)
            if mine:
                self.sw.send(self, src, Claim(MID, tuple(mine[:64])))
        self.update_membership()

    def _bye(self, src: str, complete: bool) -> None:
        if src not in self.peers:
            return
        self.peers.pop(src, None)
        self.have_of.pop(src, None)
        self.interested.discard(src)
        self.unchoked.discard(src)
        self.unchoking_us.discard(src)
        self._detach(src)
        if self.fetching:
            self.departed[src] = (self.sw.loop.now, complete)
            self.sw.loop.at(self.sw.loop.now + self.sw.params.member_grace, self.update_membership)
        self.update_membership()
        self.rechoke()

    def _have(self, src: str, index: int) -> None:
        have = self.have_of.get(src)
        if have is None or index in have:
            return
        have.add(index)
        if not self.fetching or self.picker is None:
            return
        sid = f"peer:{src}"
        if self.picker.has_source(sid):
            self.picker.source_have(sid, index)
        if len(have) == len(self.sw.sizes):
            self.update_membership()
        else:
            assert self.first_copy is not None
            self.first_copy.progress(src, index, self.sw.loop.now, wanted=self.picker.wants(index))
        if not self._poked:
            self._poked = True
            self.sw.loop.at(self.sw.loop.now + self.sw.params.sched_tick, self._poke)

    def _poke(self) -> None:
        self._poked = False
        self.schedule()

    # -- membership (protocol/_membership.py, then FirstCopy) ----------------------
    def update_membership(self) -> None:
        if not self.fetching or self.picker is None:
            return
        n = len(self.sw.sizes)
        holders = [(p, len(self.have_of[p]) == n) for p in self.peers]
        m = membership(
            holders, self.departed, banned=(), now=self.sw.loop.now, grace=self.sw.params.member_grace,
        )
        self.departed = m.departed
        self.fetchers = 1 + len(m.peers)
        relayed: Sequence[str] = ()
        if self.sw.params.gossip is not None:
            relayed = [p for p in self.sw.known if p not in self.peers and p not in m.departed and p != self.id]
        assert self.first_copy is not None
        if self.first_copy.set_members([*m.peers, *m.complete], self.sw.loop.now, relayed):
            self._withdraw_not_ours()
        self.schedule()

    def _withdraw_not_ours(self) -> None:
        """node/_engine.py _withdraw_not_ours: a mirror run none of whose pieces is ours any more is cancelled."""
        fc = self.first_copy
        assert fc is not None
        now = self.sw.loop.now
        for rid, r in list(self.reqs.items()):
            if r.sid == MIRROR_ID and not any(fc.mirror_may_take(i, now) for i in r.indices):
                self.sw.stats.withdrawn_runs += 1
                self._end_req(rid, cancel=True)

    # -- choking (protocol/_choking.py) -------------------------------------------
    def _rechoke_tick(self) -> None:
        if not self.alive:
            return
        self.rechoke()
        self.sw.loop.at(self.sw.loop.now + self.sw.params.rechoke_interval, self._rechoke_tick)

    def rechoke(self) -> None:
        keep = choose_unchoked(self.interested & self.peers.keys(), self.served, self.sw.params.upload_slots)
        for p in sorted(keep - self.unchoked):
            self.sw.send(self, p, Unchoke())
        for p in sorted(self.unchoked - keep):
            self.sw.send(self, p, Choke())
        self.unchoked = keep

    # -- sources -------------------------------------------------------------------
    def _attach(self, peer: str) -> None:
        sid = f"peer:{peer}"
        if self.fetching and self.picker is not None and peer in self.peers and not self.picker.has_source(sid):
            self.picker.add_source(sid, PEER, self.have_of[peer])
            self.active[sid] = 0

    def _drain(self, peer: str) -> None:
        """What-if (``Params.finish_on_choke``): a Choke ends the requests not yet moving; a piece on its way finishes."""
        sid = f"peer:{peer}"
        if self.picker is None or not self.picker.has_source(sid):
            return
        for rid, r in list(self.reqs.items()):
            if r.sid == sid and r.flow is None:
                self._end_req(rid, cancel=True)
        if any(r.sid == sid for r in self.reqs.values()):
            self._draining.add(sid)
        else:
            self._detach(peer)

    def _detach(self, peer: str) -> None:
        sid = f"peer:{peer}"
        if self.picker is None or not self.picker.has_source(sid):
            return
        for rid, r in list(self.reqs.items()):
            if r.sid == sid:
                self._end_req(rid, cancel=False)
        self.picker.remove_source(sid)
        self._draining.discard(sid)
        self.active.pop(sid, None)
        self._rate.pop(sid, None)

    def _max_requests(self, sid: str) -> int:
        p = self.sw.params
        if sid == MIRROR_ID:
            n = p.mirror_connections
            if self.fetchers > 1:
                n = min(n, max(2, -(-p.swarm_mirror_connections // self.fetchers)))
            return n
        rate, _ = self._rate.get(sid, (0.0, 0.0))
        if rate == 0.0:
            return p.pipeline
        return max(MIN_DEPTH, min(MAX_DEPTH, int(rate * QUEUE_TIME / max(self.sw.sizes)) + 1))

    def _request_bytes(self, sid: str) -> int:
        if sid != MIRROR_ID:
            return 1  # one piece per peer request
        p = self.sw.params
        t = self._mirror_tput
        limit = p.first_request_bytes if t is None else int(min(p.max_request_bytes, max(p.first_request_bytes // 4, 2.0 * t)))
        assert self.picker is not None
        if self._missing is None:
            self._missing = sum(s for i, s in enumerate(self.sw.sizes) if self.picker.state(i) == PieceState.NONE)
        return min(limit, max(self._missing // self._max_requests(MIRROR_ID), 1))

    # -- requests --------------------------------------------------------------------
    def schedule(self) -> None:
        pk = self.picker
        if not self.fetching or pk is None or pk.is_complete:
            return
        now = self.sw.loop.now
        order = [s for s in self.active if s != MIRROR_ID] + [MIRROR_ID]
        progress = True
        while progress:
            progress = False
            for sid in order:
                if sid in self._draining or self.active.get(sid, 0) >= self._max_requests(sid):
                    continue
                picked = pk.pick(sid, self._request_bytes(sid), now)
                if not picked:
                    continue
                self._missing = None
                self._send_req(sid, picked)
                progress = True
        self._missing = None
        d = pk.next_deadline(now)
        if d is not None and d > now and (self._wake_at is None or d < self._wake_at):
            self._wake_at = d
            self.sw.loop.at(d, self._wake, d)

    def _progress(self, index: int) -> int:
        """Bytes of piece ``index`` its furthest request has received (node/_delivery.py ``written``)."""
        now, got = self.sw.loop.now, 0.0
        for rid in self.by_piece.get(index, ()):
            r = self.reqs[rid]
            f = r.flow
            if f is not None and r.indices[r.pos if r.sid == MIRROR_ID else 0] == index:
                got = max(got, self.sw.sizes[index] - max(0.0, f.left - f.rate * (now - f.t)))
        return int(got)

    def _wake(self, d: float) -> None:
        if self._wake_at == d:
            self._wake_at = None
            self.schedule()

    def _send_req(self, sid: str, indices: list[int]) -> None:
        sw = self.sw
        rid = self._rid
        self._rid += 1
        r = self.reqs[rid] = _Req(sid, indices, sw.loop.now)
        self.active[sid] = self.active.get(sid, 0) + 1
        for i in indices:
            self.by_piece.setdefault(i, set()).add(rid)
        if sid == MIRROR_ID:
            for i in indices:
                why = self._why_mirror(i)
                sw.stats.mirror_why[why] = sw.stats.mirror_why.get(why, 0) + 1
            fetching_peers = [p for p in self.peers if len(self.have_of[p]) < len(sw.sizes)]
            for p in fetching_peers:
                sw.send(self, p, Claim(MID, tuple(indices)))
            sw.loop.at(sw.loop.now + sw.params.origin_rtt, self._mirror_next, rid)
        else:
            sw.send(self, sid[5:], ("request", rid, indices[0]))
        del r

    def _why_mirror(self, index: int) -> str:
        """Diagnostics only (reads FirstCopy's private state): whose share ``index`` was when the mirror took it."""
        fc = self.first_copy
        if fc is None:
            return "no spreading"
        o = getattr(fc, "_owner", [self.id] * (index + 1))[index]
        if o == self.id:
            return "own share"
        if o not in getattr(fc, "_seen", {}):
            return "owner not a member"
        if o in getattr(fc, "_lapsed", {}):
            return "owner broke a promise (deliver_timeout)"
        return "owner silent (owner_timeout)"

    def _mirror_next(self, rid: int) -> None:
        r = self.reqs.get(rid)
        if r is None or not self.alive:
            return
        assert self.picker is not None
        while r.pos < len(r.indices) and MIRROR_ID not in self.picker.requesters(r.indices[r.pos]):
            r.pos += 1  # a peer brought this one first (endgame)
        if r.pos >= len(r.indices):
            self._mirror_done(rid)
            return
        i = r.indices[r.pos]
        r.flow = self.sw.net.start(self.sw.origin, self.down, self.sw.sizes[i], lambda: self._mirror_piece(rid, i))

    def _mirror_piece(self, rid: int, index: int) -> None:
        r = self.reqs.get(rid)
        if r is None:
            return
        r.flow = None
        r.pos += 1
        r.bytes += self.sw.sizes[index]
        self.from_origin += self.sw.sizes[index]
        self._arrived(MIRROR_ID, index)
        if rid in self.reqs:
            self._mirror_next(rid)

    def _mirror_done(self, rid: int) -> None:
        r = self.reqs[rid]
        elapsed = self.sw.loop.now - r.sent
        if r.bytes and elapsed > 0:
            t = r.bytes / elapsed
            self._mirror_tput = t if self._mirror_tput is None else 0.7 * self._mirror_tput + 0.3 * t
        self._end_req(rid, cancel=False)
        self.schedule()

    def _serve(self, to: str, rid: int, index: int) -> None:
        """A peer's request reached us: send the piece (we advertised it, so we hold it)."""
        node = self.sw.nodes[to]
        if index not in self.have or not node.alive:
            self.sw.send(self, to, ("refused", rid))
            return
        size = self.sw.sizes[index]

        def done() -> None:
            self.served[to] = self.served.get(to, 0) + size
            self.uploads.pop(f, None)
            node._peer_piece(rid, index)

        f = self.sw.net.start(self.up, node.down, size, done)
        self.uploads[f] = None
        r = node.reqs.get(rid)
        if r is not None:
            r.flow = f
        else:
            self.sw.net.abort(f)  # the request was cancelled while it travelled

    def _refused(self, src: str, rid: int) -> None:
        r = self.reqs.get(rid)
        if r is not None and self.picker is not None:
            i = r.indices[0]
            self._end_req(rid, cancel=False)
            if r.sid in self.active:
                self.picker.piece_failed(r.sid, i, integrity=False)
            self.schedule()

    def _peer_piece(self, rid: int, index: int) -> None:
        r = self.reqs.get(rid)
        if r is None or not self.alive:
            return
        now = self.sw.loop.now
        size = self.sw.sizes[index]
        rate, last = self._rate.get(r.sid, (0.0, 0.0))
        if last:
            inst = size / max(now - last, 1e-3)
            rate = inst if rate == 0.0 else 0.8 * rate + 0.2 * inst
        self._rate[r.sid] = (rate, now)
        r.flow = None
        self._end_req(rid, cancel=False)
        self._arrived(r.sid, index)
        if r.sid in self._draining and not any(q.sid == r.sid for q in self.reqs.values()):
            self._detach(r.sid[5:])

    def _end_req(self, rid: int, cancel: bool) -> None:
        """Forget request ``rid``; ``cancel``: withdraw its pieces still requested in the picker too."""
        r = self.reqs.pop(rid)
        r.dead = True
        if r.flow is not None:
            self.sw.net.abort(r.flow)
            r.flow = None
        for i in r.indices:
            s = self.by_piece.get(i)
            if s is not None:
                s.discard(rid)
                if not s:
                    del self.by_piece[i]
        if r.sid in self.active:
            self.active[r.sid] -= 1
        if cancel and self.picker is not None and self.picker.has_source(r.sid):
            self.picker.cancel(r.sid, [i for i in r.indices[r.pos:] if r.sid in self.picker.requesters(i)])

    def _arrived(self, sid: str, index: int) -> None:
        pk = self.picker
        assert pk is not None
        if pk.state(index) == PieceState.DONE:
            self.sw.stats.duplicate_bytes += self.sw.sizes[index]
            return
        others = pk.piece_written(sid, index, now=self.sw.loop.now)
        pk.piece_done(index)
        self.have.add(index)
        for rid in list(self.by_piece.get(index, ())):
            r = self.reqs.get(rid)
            if r is None or r.sid not in others:
                continue
            if r.sid == MIRROR_ID:
                if r.indices[r.pos] == index and r.flow is not None:
                    self.sw.net.abort(r.flow)
                    r.flow = None
                    r.pos += 1
                    self.sw.loop.at(self.sw.loop.now, self._mirror_next, rid)
            else:
                self._end_req(rid, cancel=False)
        self.sw.broadcast_have(self, index)
        if pk.is_complete:
            self.complete_at = self.sw.loop.now
            self.fetching = False
            for rid in list(self.reqs):
                self._end_req(rid, cancel=False)
            for p in self.peers:
                self.sw.send(self, p, NotInterested(MID))
            return
        self.schedule()

