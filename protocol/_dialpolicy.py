"""Which addresses a peer may make this node dial, and how many dials it may queue. Pure.

Theory of operation
-------------------
Peers name addresses (a ``Peers`` introduction, a DHT provider record) and
the node dials them: a hostile peer could make a fleet of nodes scan or hit
third parties, or services on their own loopback and LAN. So an address
learned from a peer is dialled only when its host is

* a public IP address, or
* a private one (RFC 1918, CGNAT 100.64/10, IPv6 ULA fc00::/7) in the same
  private block as one of this node's own listen addresses (a node
  listening on the unspecified address counts as on every private block), or
* loopback, only when this node itself listens on loopback (tests and the
  demo run fleets on 127.0.0.1; a node listening on 0.0.0.0 or a LAN
  address never dials loopback because a peer said so).

Never link-local, multicast, unspecified, reserved, or a DNS name (only
``/ip4`` and ``/ip6`` multiaddrs): the node resolves no name a peer gives.

The bulk channel's host is never a peer's word either: the node connects to
the IP the Noise-authenticated session came from, with the port from Hello.

:class:`DialBudget` caps the dials peers cause: at most ``per_peer`` queued
for one introducer and ``total`` for all, each target once at a time, and
each introducer's dials refill at ``rate`` per second after a ``burst``
(a bootstrap node introducing a fleet spends its burst once; a peer naming
fresh ids in a loop gets one dial a second out of us, not thousands).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["DialBudget", "allowed_addrs", "may_dial", "multiaddr_host"]

_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(host: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _block(ip: IPAddress) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    return next((n for n in _PRIVATE if ip.version == n.version and ip in n), None)


def multiaddr_host(addr: str) -> str | None:
    """The IP of an ``/ip4/..`` or ``/ip6/..`` multiaddr; None for anything else (``/dns``, garbage)."""
    parts = addr.split("/")
    if len(parts) < 3 or parts[0] != "":
        return None
    kind = {"ip4": ipaddress.IPv4Address, "ip6": ipaddress.IPv6Address}.get(parts[1])
    if kind is None:
        return None
    try:
        kind(parts[2])
    except ValueError:
        return None
    return parts[2]


def may_dial(host: str, listen_hosts: Iterable[str]) -> bool:
    """Whether an address a peer named may be dialled, given this node's own listen hosts."""
    ip = _ip(host)
    if ip is None or ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_reserved:
        return False
    own = [o for o in (_ip(h) for h in listen_hosts) if o is not None]
    if ip.is_loopback:
        return any(o.is_loopback for o in own)
    block = _block(ip)
    if block is not None:
        return any(o.is_unspecified or _block(o) == block for o in own)
    return ip.is_global


def allowed_addrs(addrs: Iterable[str], listen_hosts: Iterable[str]) -> tuple[str, ...]:
    """The multiaddrs among ``addrs`` that :func:`may_dial` allows."""
    listen = list(listen_hosts)
    out = []
    for a in addrs:
        h = multiaddr_host(a)
        if h is not None and may_dial(h, listen):
            out.append(a)
    return tuple(out)


class DialBudget:
    """Dials queued because peers asked: per introducer and in total, each target once."""

    def __init__(self, per_peer: int = 16, total: int = 64, *, burst: float = 64.0, rate: float = 1.0) -> None:
        self.per_peer = per_peer
        self.total = total
        self.burst = burst
        self.rate = rate
        self._by: dict[str, set[str]] = {}  # introducer -> targets queued for it
        self._target: dict[str, str] = {}  # target -> introducer
        self._credit: dict[str, tuple[float, float]] = {}  # introducer -> (dials left, as of when)

    def __len__(self) -> int:
        return len(self._target)

    def queued_by(self, introducer: str) -> int:
        return len(self._by.get(introducer, ()))

    def admit(self, introducer: str, target: str, now: float) -> bool:
        """Queue a dial to ``target`` for ``introducer``; False if it is queued already or over budget."""
        if target in self._target or len(self._target) >= self.total:
            return False
        if len(self._by.get(introducer, ())) >= self.per_peer:
            return False
        left, since = self._credit.get(introducer, (self.burst, now))
        left = min(self.burst, left + max(now - since, 0.0) * self.rate)
        if left < 1.0:
            self._credit[introducer] = (left, now)
            return False
        self._credit[introducer] = (left - 1.0, now)
        if len(self._credit) > 4096:  # forget introducers whose credit has refilled
            full = self.burst / self.rate if self.rate > 0 else float("inf")
            self._credit = {p: c for p, c in self._credit.items() if now - c[1] < full}
        mine = self._by.setdefault(introducer, set())
        mine.add(target)
        self._target[target] = introducer
        return True

    def done(self, target: str) -> None:
        """The dial to ``target`` ended (either way)."""
        introducer = self._target.pop(target, None)
        if introducer is not None:
            mine = self._by.get(introducer)
            if mine is not None:
                mine.discard(target)
                if not mine:
                    del self._by[introducer]
