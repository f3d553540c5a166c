"""The gateway's view of policy: watch ``policy/``, validate each key alone, keep the last good value of a bad
key, compile a routing table and swap it in; report what was rejected (log, metric, status key, admin)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from policy.compile import CompiledRoute, RoutingTable
from policy.models import MeshPolicy, Route, ServicePolicy
from policy.parse import PolicyError, kind_of_key, parse
from registry.etcd import EtcdSettings
from registry.keys import Keys
from registry.mirror import PrefixMirror

log = logging.getLogger("zonemesh.policy")


class StatusRecord:
    """What a gateway reports under ``status/gateways/<id>``."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def to_json(self) -> bytes:
        return json.dumps(self.data, sort_keys=True).encode()


class PolicyState:
    """Live policy for one gateway. ``table`` is replaced (never mutated) on every change."""

    def __init__(
        self,
        settings: EtcdSettings,
        base: dict[str, Any],
        known_services: Callable[[], set[str]],
        snapshot_path: str | None = None,
        snapshot_write: bool = True,
    ) -> None:
        self.keys = Keys(settings.prefix)
        self.base = base
        self._known_services = known_services
        self._raw: dict[str, bytes] = {}
        self._good: dict[str, Route | ServicePolicy | MeshPolicy] = {}
        self._parsed: dict[str, tuple[bytes, Any]] = {}
        self.rejected: dict[str, str] = {}
        self.rejects_total = 0
        self.applied_at: float | None = None
        self.table = RoutingTable(base=base)
        self._subscribers: list[Callable[[RoutingTable], Any]] = []
        self.mirror = PrefixMirror(
            settings, [self.keys.policy], self._apply, "policy", snapshot_path, snapshot_write=snapshot_write
        )

    def subscribe(self, callback: Callable[[RoutingTable], Any]) -> None:
        self._subscribers.append(callback)

    async def start(self) -> None:
        await self.mirror.start()

    async def stop(self) -> None:
        await self.mirror.stop()

    def _apply(self, changes: dict[str, bytes | None], full: bool, revision: int) -> None:
        if full:
            for key in set(self._raw) - changes.keys():
                self._raw.pop(key, None)
        for key, raw in changes.items():
            if raw is None:
                self._raw.pop(key, None)
            else:
                self._raw[key] = raw
        self.recompile(revision)

    def recompile(self, revision: int | None = None) -> None:
        """Validate every key (a bad one keeps its last good value) and swap in a new table."""
        known = self._known_services() | {
            name
            for key in self._raw
            if (k := kind_of_key(self.keys, key)) and k[0] == "Service"
            for name in [k[1]]
        }
        for key in set(self._good) - self._raw.keys():
            del self._good[key]
        for key in set(self._parsed) - self._raw.keys():
            del self._parsed[key]
        rejected: dict[str, str] = {}
        for key, raw in self._raw.items():
            kind_name = kind_of_key(self.keys, key)
            if kind_name is None:
                rejected[key] = "unknown policy key (expected routes/<name>, services/<service> or mesh)"
                continue
            kind, _ = kind_name
            try:
                value = self._parse_cached(key, kind, raw)
                if isinstance(value, Route):
                    _check_services(value, known)
            except PolicyError as exc:
                rejected[key] = str(exc)
                continue
            self._good[key] = value
        for key, reason in rejected.items():
            if self.rejected.get(key) != reason:
                self.rejects_total += 1
                kept = "keeping its last good value" if key in self._good else "nothing in force for it"
                log.error("policy: REJECTED %s (%s): %s", key, kept, reason)
        self.rejected = rejected
        routes = []
        services: dict[str, ServicePolicy] = {}
        mesh = None
        for key, value in self._good.items():
            kind, name = kind_of_key(self.keys, key)  # type: ignore[misc]
            if isinstance(value, Route):
                routes.append(CompiledRoute(name, value))
            elif isinstance(value, ServicePolicy):
                services[name] = value
            else:
                mesh = value  # type: ignore[assignment]
        routes.sort(key=lambda r: r.order)
        rev = revision if revision is not None else self.table.revision
        self.table = RoutingTable(
            routes=tuple(routes), mesh=mesh, services=services, base=self.base, revision=rev
        )
        self.applied_at = time.time()
        for callback in list(self._subscribers):
            try:
                callback(self.table)
            except Exception:  # noqa: BLE001
                log.exception("policy subscriber failed")

    def _parse_cached(self, key: str, kind: str, raw: bytes) -> Route | ServicePolicy | MeshPolicy:
        """Parse a value once per distinct content (a change re-parses only the keys that changed)."""
        hit = self._parsed.get(key)
        if hit is None or hit[0] != raw:
            try:
                hit = (raw, parse(kind, raw))
            except PolicyError as exc:
                hit = (raw, exc)
            self._parsed[key] = hit
        if isinstance(hit[1], PolicyError):
            raise hit[1]
        return hit[1]  # type: ignore[return-value]

    def status(self, gateway_id: str, zone: str) -> StatusRecord:
        return StatusRecord(
            {
                "gateway_id": gateway_id,
                "zone": zone,
                "applied_revision": self.table.revision,
                "routes": len(self.table.routes),
                "rejected": dict(self.rejected),
                "stale": self.mirror.stale,
                "updated_at": round(time.time(), 3),
            }
        )


def _check_services(route: Route, known: set[str]) -> None:
    names = [d.service for d in route.destinations or ()] + ([route.mirror.service] if route.mirror else [])
    missing = sorted({n for n in names if n not in known})
    if missing:
        raise PolicyError(
            [
                {
                    "field": "destinations",
                    "message": f"unknown service {', '.join(map(repr, missing))} (not registered)",
                }
            ]
        )
