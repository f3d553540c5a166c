"""Balancer behaviour over many picks (pure logic, no I/O)."""

from __future__ import annotations

import collections
from dataclasses import dataclass

import pytest

from gateway.balancer import LeastRequest, RingHash, RoundRobin, make_balancer


@dataclass
class Ep:
    id: str
    weight: int = 100
    active: int = 0


def test_weighted_round_robin_is_exact_and_smooth() -> None:
    eps = [Ep("a", 5), Ep("b", 1), Ep("c", 1)]
    rr = RoundRobin()
    picks = [rr.pick(eps).id for _ in range(700)]
    assert collections.Counter(picks) == {"a": 500, "b": 100, "c": 100}
    # Smooth: the heavy endpoint never gets more than 5 in a row out of a 7-pick cycle.
    assert "aaaaaa" not in "".join(picks)


def test_least_request_prefers_idle_endpoints() -> None:
    eps = [Ep("busy", active=50), Ep("idle1"), Ep("idle2")]
    lr = LeastRequest()
    picks = collections.Counter(lr.pick(eps).id for _ in range(3000))
    # "busy" only wins when both random choices are... never: any pair with an idle one picks the idle one.
    assert picks["busy"] == 0
    assert 1200 < picks["idle1"] < 1800


def test_least_request_respects_weight() -> None:
    eps = [Ep("big", weight=300, active=3), Ep("small", weight=100, active=2)]
    assert LeastRequest().pick(eps).id == "big"  # 3/300 < 2/100


def test_ring_hash_is_sticky_and_moves_little() -> None:
    eps = [Ep(f"e{n}") for n in range(5)]
    ring = RingHash()
    keys = [f"user-{n}".encode() for n in range(2000)]
    before = {k: ring.pick(eps, k).id for k in keys}
    assert before == {k: ring.pick(eps, k).id for k in keys}
    counts = collections.Counter(before.values())
    assert all(250 < c < 600 for c in counts.values()), counts
    after = {k: ring.pick(eps[:4], k).id for k in keys}  # e4 leaves
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "e4" for k in moved)
    assert len(moved) == counts["e4"]


def test_unknown_balancer_is_named() -> None:
    with pytest.raises(ValueError, match="unknown balancer 'nope'"):
        make_balancer("nope")
