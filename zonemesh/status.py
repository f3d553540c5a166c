"""``zonemesh status``: what is registered right now (services -> zones -> instances, and gateways)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from registry.etcd import EtcdSettings, close_quietly
from registry.keys import Keys
from registry.model import GatewayRecord, Instance


async def collect(settings: EtcdSettings) -> dict[str, Any]:
    """Read instances and gateways with the TTL left on their leases."""
    keys = Keys(settings.prefix)
    client = settings.client()
    try:
        await client.connect()
        services = await client.get_prefix(keys.services.encode())
        gateways = await client.get_prefix(keys.gateways.encode())
        leases = {kv.lease for kv in [*services, *gateways] if kv.lease}
        sem = asyncio.Semaphore(32)

        async def ttl(lease: int) -> tuple[int, int]:
            async with sem:
                return lease, (await client.get_lease_info(lease, keys=False)).TTL

        ttls = dict(await asyncio.gather(*(ttl(lease) for lease in leases)))
    finally:
        await close_quietly(client)
    now = time.time()
    out: dict[str, Any] = {
        "revision": services.header.revision,
        "services": {},
        "gateways": {},
        "invalid": [],
    }
    for kv in services:
        key = kv.key.decode()
        try:
            inst = Instance.from_json(kv.value)
        except ValueError as exc:
            out["invalid"].append({"key": key, "reason": str(exc)})
            continue
        row = {
            "id": inst.id,
            "address": inst.hostport,
            "age_s": round(max(0.0, now - inst.registered_at), 1),
            "ttl_left_s": ttls.get(kv.lease),
            "version": inst.version,
            "tags": inst.tags,
        }
        out["services"].setdefault(inst.service, {}).setdefault(inst.zone, []).append(row)
    for kv in gateways:
        key = kv.key.decode()
        try:
            gw = GatewayRecord.from_json(kv.value)
        except ValueError as exc:
            out["invalid"].append({"key": key, "reason": str(exc)})
            continue
        out["gateways"].setdefault(gw.zone, []).append(
            {
                "id": gw.id,
                "address": gw.hostport,
                "ttl_left_s": ttls.get(kv.lease),
                "config_revision": gw.config_revision,
            }
        )
    return out


def render(data: dict[str, Any], fmt: str) -> str:
    """Render collected status as ``table`` or ``json``."""
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=True)
    rows = [("SERVICE", "ZONE", "INSTANCE", "ADDRESS", "AGE", "TTL LEFT")]
    for service in sorted(data["services"]):
        for zone in sorted(data["services"][service]):
            for inst in sorted(data["services"][service][zone], key=lambda r: r["id"]):
                ttl = "-" if inst["ttl_left_s"] is None else f"{inst['ttl_left_s']}s"
                rows.append((service, zone, inst["id"], inst["address"], _age(inst["age_s"]), ttl))
    lines = _table(rows) if len(rows) > 1 else ["no services registered"]
    if data["gateways"]:
        gw_rows = [("GATEWAY ZONE", "GATEWAY", "ADDRESS", "TTL LEFT")]
        for zone in sorted(data["gateways"]):
            for gw in data["gateways"][zone]:
                ttl = "-" if gw["ttl_left_s"] is None else f"{gw['ttl_left_s']}s"
                gw_rows.append((zone, gw["id"], gw["address"], ttl))
        lines += ["", *_table(gw_rows)]
    for bad in data["invalid"]:
        lines.append(f"invalid value at {bad['key']}: {bad['reason']}")
    return "\n".join(lines)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{int(seconds)}s"
    if seconds < 7200:
        return f"{int(seconds // 60)}m"
    return f"{int(seconds // 3600)}h"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
