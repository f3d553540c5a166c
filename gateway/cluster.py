"""Endpoints (instances and peer gateways) by service and zone, kept in step with the catalog, with health."""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Final

from gateway.balancer import Balancer, make_balancer
from gateway.config import GatewayConfig
from gateway.upstream import Pool, PoolStats
from policy.compile import RoutingTable
from policy.models import ServicePolicy
from registry.catalog import Snapshot
from registry.model import GatewayRecord, Instance

log = logging.getLogger("zonemesh.gateway.health")
_monotonic: Final = time.monotonic  # (called per request: read once)


class Endpoint:
    """One dialable upstream (a registered instance or a peer zone gateway) with its pool and health state."""

    __slots__ = (
        "id", "key", "zone", "zone_b", "zone_line", "host", "port", "weight", "record", "pool", "active", "service", "next_check",
        "hc_healthy", "hc_passes", "hc_fails", "failures", "ejected_until", "ejections", "removed",
    )  # fmt: skip

    def __init__(
        self, key: str, record: Instance | GatewayRecord, policy: ServicePolicy, stats: PoolStats
    ) -> None:
        self.key = key
        self.id = record.id
        self.service = record.service if isinstance(record, Instance) else None
        self.next_check = 0.0
        self.zone = record.zone
        self.zone_b = record.zone.encode()
        self.zone_line = b"x-zonemesh-zone: %b\r\n" % self.zone_b  # (the response header, formatted once)
        self.host = record.address
        self.port = record.port
        self.weight = getattr(record, "weight", 100)
        self.record = record
        self.pool = Pool(record.address, record.port, stats=stats)
        self.configure(policy)
        self.active = 0
        self.hc_healthy = True  # registered = presumed healthy until active checks say otherwise
        self.hc_passes = 0
        self.hc_fails = 0
        self.failures = 0  # consecutive passive failures (5xx, connect failure, reset)
        self.ejected_until = 0.0
        self.ejections = 0
        self.removed = False

    def configure(self, policy: ServicePolicy) -> None:
        """Apply (changed) destination policy to this endpoint's pool."""
        pool = self.pool
        pool.max_connections = policy.circuit_breaker.max_connections
        pool.max_pending = policy.circuit_breaker.max_pending
        pool.connect_timeout = policy.timeouts.connect
        pool.idle_timeout = max(policy.timeouts.idle, 1.0)

    def in_subset(self, subset: dict[str, str]) -> bool:
        record = self.record
        tags = getattr(record, "tags", {})
        for key, value in subset.items():
            if key == "version" and getattr(record, "version", None) == value:
                continue
            if tags.get(key) != value:
                return False
        return True

    def available(self, now: float) -> bool:
        return self.hc_healthy and now >= self.ejected_until and not self.removed

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def state(self, now: float) -> dict[str, object]:
        return {
            "id": self.id,
            "zone": self.zone,
            "address": self.address,
            "weight": self.weight,
            "active_requests": self.active,
            "healthy": self.hc_healthy,
            "ejected_for_s": round(max(0.0, self.ejected_until - now), 1),
            "ejections": self.ejections,
            "open_connections": self.pool.open_connections,
        }


class ClusterSet:
    """Every endpoint we may dial, rebuilt from each catalog snapshot (state of unchanged endpoints is kept)."""

    def __init__(self, config: GatewayConfig, stats: PoolStats | None = None) -> None:
        self.config = config
        self.zone = config.zone
        self.stats = stats or PoolStats()
        self.table = RoutingTable(base=base_policy(config))
        self.active_requests: defaultdict[str, int] = defaultdict(int)
        self.active_retries: defaultdict[str, int] = defaultdict(int)
        self.services: dict[str, dict[str, list[Endpoint]]] = {}
        self.gateways: dict[str, list[Endpoint]] = {}
        self.gateway_hosts: frozenset[str] = frozenset()
        self._by_key: dict[str, Endpoint] = {}
        self.checked: list[Endpoint] = []  # endpoints with a health path, for the active checker
        self._balancers: dict[tuple[str, str, tuple[tuple[str, str], ...]], Balancer] = {}
        self.ejections_total = 0
        self.revision = 0

    # --- catalog sync -----------------------------------------------------------------------------------
    def update(self, snap: Snapshot) -> None:
        """Apply a catalog snapshot: new endpoints appear, gone ones drain (in-flight requests finish)."""
        seen: dict[str, Endpoint] = {}
        services: dict[str, dict[str, list[Endpoint]]] = {}
        for service, zones in snap.services.items():
            services[service] = {
                zone: [self._endpoint(seen, f"i/{service}/{zone}/{i.id}", i) for i in insts]
                for zone, insts in zones.items()
            }
        gateways: dict[str, list[Endpoint]] = {}
        for zone, gws in snap.gateways.items():
            gateways[zone] = [self._endpoint(seen, f"g/{zone}/{g.id}", g) for g in gws]
        for key, ep in self._by_key.items():
            if key not in seen:
                ep.removed = True
                ep.pool.close()
        self._by_key = seen
        self.checked = [ep for ep in seen.values() if getattr(ep.record, "health_path", None)]
        self.services = services
        self.gateways = gateways
        self.gateway_hosts = frozenset(ep.host for eps in gateways.values() for ep in eps)
        self.revision = snap.revision

    def _endpoint(self, seen: dict[str, Endpoint], key: str, record: Instance | GatewayRecord) -> Endpoint:
        ep = self._by_key.get(key)
        if ep is None or ep.host != record.address or ep.port != record.port:
            if ep is not None:
                ep.removed = True
                ep.pool.close()
            policy = self.table.service_policy(record.service if isinstance(record, Instance) else "")
            ep = Endpoint(key, record, policy, self.stats)
        else:
            ep.record = record
            ep.weight = getattr(record, "weight", 100)
        seen[key] = ep
        return ep

    def apply_policy(self, table: RoutingTable) -> None:
        """A new routing table: re-configure pools, and start balancers afresh where the kind changed."""
        old = self.table
        self.table = table
        for ep in self._by_key.values():
            ep.configure(table.service_policy(ep.service or ""))
        for key in list(self._balancers):
            if old.service_policy(key[0]).balancer != table.service_policy(key[0]).balancer:
                del self._balancers[key]

    # --- picking ----------------------------------------------------------------------------------------
    def known(self, service: str) -> bool:
        return service in self.services

    def pick_local(
        self,
        service: str,
        exclude: Sequence[Endpoint] = (),
        key: bytes | None = None,
        subset: dict[str, str] | None = None,
    ) -> Endpoint | None:
        zones = self.services.get(service)
        eps = zones.get(self.zone) if zones is not None else None
        if not eps:
            return None
        now = _monotonic()
        if subset:
            ready = [e for e in eps if e.available(now) and e not in exclude and e.in_subset(subset)]
        else:
            ready = [e for e in eps if e.available(now) and e not in exclude]
        if not ready:
            return None
        bkey = (service, self.zone, tuple(sorted(subset.items())) if subset else ())
        balancer = self._balancers.get(bkey)
        if balancer is None:
            balancer = self._balancers[bkey] = make_balancer(self.table.service_policy(service).balancer)
        return balancer.pick(ready, key)  # type: ignore[return-value]

    def pick_remote(
        self, service: str, exclude: Sequence[Endpoint] = (), subset: dict[str, str] | None = None
    ) -> Endpoint | None:
        """A peer gateway of another zone that has (matching) instances of ``service`` (least loaded of two)."""
        now = time.monotonic()
        zones = [
            z
            for z, eps in self.services.get(service, {}).items()
            if z != self.zone and eps and (not subset or any(e.in_subset(subset) for e in eps))
        ]
        candidates = [
            gw for z in zones for gw in self.gateways.get(z, ()) if gw.available(now) and gw not in exclude
        ]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        a, b = random.sample(candidates, 2)
        return a if a.active <= b.active else b

    # --- passive health (outlier detection) -------------------------------------------------------------
    def report(self, ep: Endpoint, ok: bool) -> None:
        """Record an exchange result; eject after ``consecutive`` failures, for longer each time."""
        if ok:
            ep.failures = 0
            return
        ep.failures += 1
        outlier = self.table.service_policy(ep.service or "").outlier_detection
        if ep.failures >= outlier.consecutive_failures and time.monotonic() >= ep.ejected_until:
            ep.ejections += 1
            self.ejections_total += 1
            duration = min(outlier.max_ejection, outlier.base_ejection * ep.ejections)
            ep.ejected_until = time.monotonic() + duration
            ep.failures = 0
            log.warning("ejected %s (%s) for %.0fs after %d consecutive failures", ep.id, ep.address, duration,
                        outlier.consecutive_failures)  # fmt: skip

    # --- active health ----------------------------------------------------------------------------------
    def record_check(self, ep: Endpoint, ok: bool, reason: str = "") -> None:
        """Apply one active health check result with rise/fall thresholds (never lifts an ejection)."""
        hc = self.table.service_policy(ep.service or "").health_check
        if ok:
            ep.hc_passes += 1
            ep.hc_fails = 0
            if not ep.hc_healthy and ep.hc_passes >= hc.healthy_threshold:
                ep.hc_healthy = True
                log.warning("%s (%s) is healthy again", ep.id, ep.address)
        else:
            ep.hc_fails += 1
            ep.hc_passes = 0
            if ep.hc_healthy and ep.hc_fails >= hc.unhealthy_threshold:
                ep.hc_healthy = False
                log.warning(
                    "%s (%s) failed %d health checks (%s): unhealthy", ep.id, ep.address, ep.hc_fails, reason
                )

    def close(self) -> None:
        for ep in self._by_key.values():
            ep.pool.close()

    def evict_idle(self) -> None:
        for ep in self._by_key.values():
            ep.pool.evict_idle()


def base_policy(config: GatewayConfig) -> dict[str, Any]:
    """The gateway's flags as a destination-policy layer (under mesh defaults and per-service policy)."""
    return {
        "balancer": config.balancer,
        "hash_header": config.hash_header,
        "timeouts": {
            "connect": config.connect_timeout,
            "request": config.request_timeout,
            "idle": config.body_timeout,
        },
        "retries": {"attempts": config.connect_retries},
        "circuit_breaker": {"max_connections": config.max_connections, "max_pending": config.max_pending},
        "outlier_detection": {
            "consecutive_failures": config.outlier_consecutive,
            "base_ejection": config.outlier_base_ejection,
            "max_ejection": config.outlier_max_ejection,
        },
        "health_check": {
            "interval": config.hc_interval,
            "timeout": config.hc_timeout,
            "healthy_threshold": config.hc_healthy,
            "unhealthy_threshold": config.hc_unhealthy,
        },
    }
