"""The admin listener (separate port): health, readiness, Prometheus metrics, catalog and config views."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

if TYPE_CHECKING:
    from gateway.server import Gateway


def make_worker_stats_app(gw: Gateway) -> Starlette:
    """What an extra worker serves on its private unix socket: its metrics, for worker 0 to merge."""

    async def export(_: Request) -> JSONResponse:
        return JSONResponse(gw.metrics.export())

    return Starlette(routes=[Route("/metrics.json", export)])


def make_admin_app(gw: Gateway) -> Starlette:
    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "zone": gw.config.zone, "gateway_id": gw.config.gateway_id})

    async def readyz(_: Request) -> JSONResponse:
        if gw.catalog.ready and gw.policy.mirror.synced.is_set():
            return JSONResponse(
                {
                    "ready": True,
                    "stale": gw.catalog.stale or gw.policy.mirror.stale,
                    "from_snapshot": gw.catalog.mirror.from_snapshot or gw.policy.mirror.from_snapshot,
                    "revision": gw.catalog.mirror.revision,
                }
            )
        return JSONResponse(
            {"ready": False, "reason": "waiting for the first catalog and policy snapshots"}, status_code=503
        )

    async def metrics(_: Request) -> PlainTextResponse:
        merged = gw.metrics.merged(await gw.worker_metrics()) if gw.worker_sockets else gw.metrics
        return PlainTextResponse(merged.render(), media_type="text/plain; version=0.0.4")

    async def catalog(_: Request) -> JSONResponse:
        now = time.monotonic()
        clusters = gw.clusters
        return JSONResponse(
            {
                "revision": gw.catalog.mirror.revision,
                "stale": gw.catalog.stale,
                "zone": gw.config.zone,
                "services": {
                    svc: {zone: [ep.state(now) for ep in eps] for zone, eps in zones.items()}
                    for svc, zones in clusters.services.items()
                },
                "gateways": {zone: [ep.state(now) for ep in eps] for zone, eps in clusters.gateways.items()},
                "rejected": gw.catalog.rejected,
            }
        )

    async def config(_: Request) -> JSONResponse:
        cfg = gw.config
        return JSONResponse(
            {
                "gateway_id": cfg.gateway_id,
                "zone": cfg.zone,
                "listen": f"{cfg.listen[0]}:{gw.port}",
                "etcd": {"endpoints": list(cfg.etcd.endpoints), "prefix": cfg.etcd.prefix},
                "catalog": {
                    "revision": gw.catalog.mirror.revision,
                    "stale": gw.catalog.stale,
                    "last_error": gw.catalog.mirror.last_error,
                },
                "policy": {
                    "revision": gw.policy.table.revision,
                    "stale": gw.policy.mirror.stale,
                    "routes": [r.name for r in gw.policy.table.routes],
                    "services": sorted(gw.policy.table.services),
                    "mesh": gw.policy.table.mesh is not None,
                    "rejected": gw.policy.rejected,
                },
                "routing": {
                    "host_suffix": cfg.host_suffix,
                    "path_routing": cfg.path_routing,
                    "strip_prefix": cfg.strip_prefix,
                    "balancer": cfg.balancer,
                    "hash_header": cfg.hash_header,
                },
                "timeouts": {
                    "connect": cfg.connect_timeout,
                    "request": cfg.request_timeout,
                    "body": cfg.body_timeout,
                    "header": cfg.header_timeout,
                    "pool_idle": cfg.pool_idle_timeout,
                },
                "limits": {
                    "max_header_bytes": cfg.max_header_bytes,
                    "max_body_bytes": cfg.max_body_bytes,
                    "max_connections_per_endpoint": cfg.max_connections,
                    "connect_retries": cfg.connect_retries,
                },
                "health": {
                    "interval": cfg.hc_interval,
                    "timeout": cfg.hc_timeout,
                    "healthy_threshold": cfg.hc_healthy,
                    "unhealthy_threshold": cfg.hc_unhealthy,
                    "outlier_consecutive_failures": cfg.outlier_consecutive,
                    "outlier_base_ejection_s": cfg.outlier_base_ejection,
                },
            }
        )

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/v1/catalog", catalog),
            Route("/v1/config", config),
        ]
    )
