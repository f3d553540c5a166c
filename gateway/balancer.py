"""Load balancers over a cluster's available endpoints: weighted round robin, P2C least-request, ring hash."""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from typing import ClassVar, Protocol


class Weighted(Protocol):
    id: str
    weight: int
    active: int


class Balancer:
    """Picks one endpoint from a non-empty sequence of available ones."""

    name: ClassVar[str] = "base"

    def pick(self, endpoints: Sequence[Weighted], key: bytes | None = None) -> Weighted:
        raise NotImplementedError


class RoundRobin(Balancer):
    """Smooth weighted round robin (nginx's algorithm): even spread, proportional to weight."""

    name: ClassVar[str] = "round_robin"

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, endpoints: Sequence[Weighted], key: bytes | None = None) -> Weighted:
        if len(endpoints) == 1:
            return endpoints[0]
        current = self._current
        if len(current) > 4 * len(endpoints):
            live = {e.id for e in endpoints}
            for gone in [k for k in current if k not in live]:
                del current[gone]
        total = 0
        best = None
        best_value = 0
        for ep in endpoints:
            value = current.get(ep.id, 0) + ep.weight
            current[ep.id] = value
            total += ep.weight
            if best is None or value > best_value:
                best, best_value = ep, value
        assert best is not None
        current[best.id] = best_value - total
        return best


class LeastRequest(Balancer):
    """Power of two choices: of two random endpoints, the one with fewer requests in flight per weight."""

    name: ClassVar[str] = "least_request"

    def pick(self, endpoints: Sequence[Weighted], key: bytes | None = None) -> Weighted:
        n = len(endpoints)
        if n == 1:
            return endpoints[0]
        i = random.randrange(n)
        j = random.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = endpoints[i], endpoints[j]
        # Compare active/weight without division: a.active / a.weight <= b.active / b.weight.
        return a if a.active * b.weight <= b.active * a.weight else b


class RingHash(Balancer):
    """Consistent hashing on a request key (e.g. a header): the same key lands on the same endpoint while it
    is available, and only ~1/n of keys move when an endpoint comes or goes. Without a key: random."""

    name: ClassVar[str] = "ring_hash"
    POINTS_PER_WEIGHT: ClassVar[int] = 1  # points per weight unit (weight 100 -> 100 points)

    def __init__(self) -> None:
        self._ring_ids: tuple[str, ...] = ()
        self._hashes: list[int] = []
        self._owners: list[str] = []

    def _build(self, endpoints: Sequence[Weighted]) -> None:
        points: list[tuple[int, str]] = []
        for ep in endpoints:
            for n in range(max(1, ep.weight * self.POINTS_PER_WEIGHT)):
                points.append((_hash64(f"{ep.id}#{n}".encode()), ep.id))
        points.sort()
        self._hashes = [h for h, _ in points]
        self._owners = [o for _, o in points]
        self._ring_ids = tuple(sorted(e.id for e in endpoints))

    def pick(self, endpoints: Sequence[Weighted], key: bytes | None = None) -> Weighted:
        if key is None:
            return random.choice(endpoints)
        ids = tuple(sorted(e.id for e in endpoints))
        if ids != self._ring_ids:
            self._build(endpoints)
        by_id = {e.id: e for e in endpoints}
        idx = bisect.bisect(self._hashes, _hash64(key)) % len(self._hashes)
        return by_id[self._owners[idx]]


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


BALANCERS: dict[str, type[Balancer]] = {b.name: b for b in (RoundRobin, LeastRequest, RingHash)}


def make_balancer(name: str) -> Balancer:
    try:
        return BALANCERS[name]()
    except KeyError:
        raise ValueError(f"unknown balancer {name!r}; one of {', '.join(sorted(BALANCERS))}") from None
