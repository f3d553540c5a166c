"""Compile validated policy into an immutable routing table the gateway swaps in atomically."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from policy.models import Destination, MeshPolicy, Route, ServicePolicy
from policy.parse import effective_service_policy


def _value_matcher(m: Any) -> tuple[str, str, Any]:
    if m.exact is not None:
        return m.name.lower(), "exact", m.exact
    if m.regex is not None:
        return m.name.lower(), "regex", re.compile(m.regex)
    return m.name.lower(), "present", m.present


def _check(kind: str, expected: Any, actual: str | None) -> bool:
    if kind == "present":
        return (actual is not None) == expected
    if actual is None:
        return False
    if kind == "exact":
        return actual == expected
    return expected.fullmatch(actual) is not None


class CompiledRoute:
    """A route with its matchers prepared; ``matches`` is called on the request path."""

    __slots__ = (
        "name", "spec", "order", "hosts", "wildcards", "path_kind", "path_value", "methods", "header_matchers",
        "query_matchers", "destinations", "cumulative", "total_weight",
    )  # fmt: skip

    def __init__(self, name: str, spec: Route) -> None:
        self.name = name
        self.spec = spec
        m = spec.match
        self.hosts = frozenset(h for h in m.hosts if not h.startswith("*."))
        self.wildcards = tuple(h[1:] for h in m.hosts if h.startswith("*."))  # ".example.com"
        self.path_kind, self.path_value = "any", None
        if m.path is not None:
            if m.path.exact is not None:
                self.path_kind, self.path_value = "exact", m.path.exact
            elif m.path.prefix is not None:
                self.path_kind, self.path_value = "prefix", m.path.prefix
            else:
                self.path_kind, self.path_value = "regex", re.compile(m.path.regex)  # type: ignore[arg-type]
        self.methods = frozenset(m.methods)
        self.header_matchers = tuple(_value_matcher(h) for h in m.headers)
        self.query_matchers = tuple(_value_matcher(q) for q in m.query)
        self.destinations: tuple[Destination, ...] = tuple(spec.destinations or ())
        acc = 0
        cumulative = []
        for d in self.destinations:
            acc += d.weight
            cumulative.append(acc)
        self.cumulative = tuple(cumulative)
        self.total_weight = acc
        # Most specific first among equal priorities: exact host > wildcard > any; exact path > longest prefix >
        # regex > any; more header/query/method conditions; then the name, so ties resolve deterministically.
        host_rank = 2 if self.hosts else (1 if self.wildcards else 0)
        path_rank = {"exact": 3, "prefix": 2, "regex": 1, "any": 0}[self.path_kind]
        plen = len(self.path_value) if self.path_kind in ("exact", "prefix") else 0
        extra = len(self.header_matchers) + len(self.query_matchers) + (1 if self.methods else 0)
        self.order = (-spec.priority, -host_rank, -path_rank, -plen, -extra, name)

    def host_matches(self, host: str) -> bool:
        if not self.hosts and not self.wildcards:
            return True
        return host in self.hosts or any(host.endswith(w) for w in self.wildcards)

    def matches(self, method: str, path: str, headers: dict[str, str], query: dict[str, str] | None) -> bool:
        kind = self.path_kind
        if kind == "prefix":
            if not path.startswith(self.path_value):  # type: ignore[arg-type]
                return False
        elif kind == "exact":
            if path != self.path_value:
                return False
        elif kind == "regex" and self.path_value.fullmatch(path) is None:  # type: ignore[union-attr]
            return False
        if self.methods and method not in self.methods:
            return False
        for name, how, expected in self.header_matchers:
            if not _check(how, expected, headers.get(name)):
                return False
        if self.query_matchers:
            q = query or {}
            for name, how, expected in self.query_matchers:
                if not _check(how, expected, q.get(name)):
                    return False
        return True

    def pick_destination(self) -> Destination:
        if len(self.destinations) == 1:
            return self.destinations[0]
        r = random.random() * self.total_weight
        for dest, edge in zip(self.destinations, self.cumulative, strict=True):
            if r < edge:
                return dest
        return self.destinations[-1]


@dataclass(frozen=True)
class RoutingTable:
    """Routes in match order plus per-service effective policy; never mutated after it is built."""

    routes: tuple[CompiledRoute, ...] = ()
    mesh: MeshPolicy | None = None
    services: dict[str, ServicePolicy] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    revision: int = 0
    needs_headers: bool = field(default=False, init=False)  # some route matches on headers (computed)

    def __post_init__(self) -> None:
        by_host: dict[str, list[CompiledRoute]] = {}
        for r in self.routes:
            for h in r.hosts:
                by_host.setdefault(h, []).append(r)
        # Routes that may match any host not listed exactly (wildcards and host-less routes), in order.
        generic = tuple(r for r in self.routes if r.wildcards or not r.hosts)
        object.__setattr__(self, "_generic", generic)
        object.__setattr__(self, "needs_headers", any(r.header_matchers for r in self.routes))
        object.__setattr__(
            self,
            "_by_host",
            {h: tuple(sorted([*rs, *(g for g in generic if g.host_matches(h))], key=lambda r: r.order))
             for h, rs in by_host.items()},
        )  # fmt: skip
        object.__setattr__(self, "_candidates", lru_cache(maxsize=4096)(self._candidates_uncached))
        default = effective_service_policy(self.mesh, None, self.base)
        object.__setattr__(self, "_default_policy", default)
        object.__setattr__(
            self,
            "_effective",
            {name: effective_service_policy(self.mesh, p, self.base) for name, p in self.services.items()},
        )

    def _candidates_uncached(self, host: str) -> tuple[CompiledRoute, ...]:
        exact = self._by_host.get(host)  # type: ignore[attr-defined]
        if exact is not None:
            return exact
        return tuple(r for r in self._generic if r.host_matches(host))  # type: ignore[attr-defined]

    def match(
        self, method: str, host: str, path: str, headers: dict[str, str], query: dict[str, str] | None
    ) -> CompiledRoute | None:
        if not self.routes:
            return None
        for route in self._candidates(host):  # type: ignore[attr-defined]
            if route.matches(method, path, headers, query):
                return route
        return None

    def service_policy(self, service: str) -> ServicePolicy:
        """Effective policy: built-in <- gateway flags <- mesh defaults <- the service's own."""
        return self._effective.get(service, self._default_policy)  # type: ignore[attr-defined]
