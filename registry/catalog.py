"""The catalog: a consistent, live view of every registered instance and gateway."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from registry.etcd import EtcdSettings
from registry.keys import Keys
from registry.mirror import PrefixMirror
from registry.model import GatewayRecord, Instance

log = logging.getLogger("zonemesh.catalog")


@dataclass(frozen=True)
class Snapshot:
    """An immutable view: ``services[service][zone]`` and ``gateways[zone]`` are tuples sorted by id."""

    revision: int = 0
    services: MappingProxyType[str, MappingProxyType[str, tuple[Instance, ...]]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    gateways: MappingProxyType[str, tuple[GatewayRecord, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def instances(self, service: str, zone: str | None = None) -> tuple[Instance, ...]:
        zones = self.services.get(service, {})
        if zone is not None:
            return zones.get(zone, ())
        return tuple(i for z in sorted(zones) for i in zones[z])

    @property
    def instance_count(self) -> int:
        return sum(len(v) for zones in self.services.values() for v in zones.values())


Subscriber = Callable[[Snapshot], Any]


class Catalog:
    """Snapshot + watch of ``services/`` and ``gateways/``; invalid values are skipped with a logged reason."""

    def __init__(
        self, settings: EtcdSettings, snapshot_path: str | None = None, snapshot_write: bool = True
    ) -> None:
        self.keys = Keys(settings.prefix)
        self._instances: dict[str, Instance] = {}
        self._gateways: dict[str, GatewayRecord] = {}
        self.rejected: dict[str, str] = {}
        self.snapshot = Snapshot()
        self._subscribers: list[Subscriber] = []
        self._dirty_extra: set[str] = set()
        self.mirror = PrefixMirror(
            settings, [self.keys.services, self.keys.gateways], self._apply, "catalog", snapshot_path,
            snapshot_write=snapshot_write,
        )  # fmt: skip

    @property
    def stale(self) -> bool:
        """True while the catalog cannot reach etcd (it serves the last snapshot meanwhile)."""
        return self.mirror.stale

    @property
    def ready(self) -> bool:
        return self.mirror.synced.is_set()

    async def start(self, wait: float | None = None) -> None:
        """Start syncing; with ``wait`` seconds, wait for the first snapshot (TimeoutError if none)."""
        await self.mirror.start()
        if wait is not None:
            await asyncio.wait_for(self.mirror.synced.wait(), wait)

    async def stop(self) -> None:
        await self.mirror.stop()

    async def __aenter__(self) -> Catalog:
        await self.start(wait=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(snapshot)`` after every change; returns an unsubscribe function."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def _apply(self, changes: dict[str, bytes | None], full: bool, revision: int) -> None:
        dirty: set[str] = set()
        if full:
            gone = (set(self._instances) | set(self._gateways) | set(self.rejected)) - changes.keys()
            for key in gone:
                dirty.add(self._apply_one(key, None))
        for key, raw in changes.items():
            dirty.add(self._apply_one(key, raw))
        self.snapshot = self._build(revision, dirty)
        for callback in list(self._subscribers):
            try:
                callback(self.snapshot)
            except Exception:  # noqa: BLE001 - one bad subscriber must not stop the others
                log.exception("catalog subscriber failed")

    def _apply_one(self, key: str, raw: bytes | None) -> str:
        """Apply one change; returns what it dirtied: a service name, or "" for gateways."""
        is_instance = key.startswith(self.keys.services)
        if raw is None:
            self.rejected.pop(key, None)
            if is_instance:
                old = self._instances.pop(key, None)
                return old.service if old else ""
            self._gateways.pop(key, None)
            return ""
        try:
            record = self._decode(key, raw, is_instance)
        except ValueError as exc:
            if self.rejected.get(key) != str(exc):
                log.warning("catalog: rejected %s (last good value, if any, stays): %s", key, exc)
            self.rejected[key] = str(exc)
            return ""
        self.rejected.pop(key, None)
        if isinstance(record, Instance):
            old = self._instances.get(key)
            self._instances[key] = record
            if old is not None and old.service != record.service:
                self._dirty_extra.add(old.service)
            return record.service
        self._gateways[key] = record
        return ""

    def _decode(self, key: str, raw: bytes, is_instance: bool) -> Instance | GatewayRecord:
        if is_instance:
            got = self.keys.parse_instance(key)
            inst = Instance.from_json(raw)
            expected: tuple[str, ...] = (inst.service, inst.zone, inst.id)
            record: Instance | GatewayRecord = inst
        else:
            got = self.keys.parse_gateway(key)
            gw = GatewayRecord.from_json(raw)
            expected, record = (gw.zone, gw.id), gw
        if expected != got:
            raise ValueError(f"value names {'/'.join(expected)} but the key says {'/'.join(got)}")
        return record

    def _build(self, revision: int, dirty: set[str]) -> Snapshot:
        dirty |= self._dirty_extra
        self._dirty_extra = set()
        services = dict(self.snapshot.services)
        if dirty - {""}:
            grouped: dict[str, dict[str, list[Instance]]] = {s: {} for s in dirty if s}
            for inst in self._instances.values():
                if inst.service in grouped:
                    grouped[inst.service].setdefault(inst.zone, []).append(inst)
            for name, zones in grouped.items():
                if zones:
                    services[name] = MappingProxyType(
                        {z: tuple(sorted(v, key=lambda i: i.id)) for z, v in sorted(zones.items())}
                    )
                else:
                    services.pop(name, None)
        gateways: dict[str, list[GatewayRecord]] = {}
        for gw in self._gateways.values():
            gateways.setdefault(gw.zone, []).append(gw)
        return Snapshot(
            revision=revision,
            services=MappingProxyType(dict(sorted(services.items()))),
            gateways=MappingProxyType(
                {z: tuple(sorted(v, key=lambda g: g.id)) for z, v in sorted(gateways.items())}
            ),
        )
