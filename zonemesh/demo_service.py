"""A small demo HTTP service that self-registers with ``HeartbeatClient`` (used by ``zonemesh up``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.listen import bind
from registry.etcd import EtcdSettings
from registry.heartbeat import HeartbeatClient
from registry.model import Instance, new_instance_id


def make_app(instance: Instance, settings: EtcdSettings, ttl: int) -> Starlette:
    """The demo app: echoes who answered; registers on startup, deregisters on shutdown."""

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "service": instance.service,
                "zone": instance.zone,
                "instance": instance.id,
                "method": request.method,
                "path": request.url.path,
                "request_id": request.headers.get("x-request-id"),
            }
        )

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with HeartbeatClient(instance, settings, ttl=ttl):
            yield

    return Starlette(
        routes=[
            Route("/healthz", health),
            Route("/{path:path}", hello, methods=["GET", "POST", "PUT", "DELETE"]),
        ],
        lifespan=lifespan,
    )


def serve(service: str, zone: str, host: str, port: int, settings: EtcdSettings, ttl: int = 10) -> None:
    """Serve until SIGINT/SIGTERM, registered as ``service`` in ``zone``."""
    sock = bind(host, port)
    instance = Instance(
        id=new_instance_id(service),
        service=service,
        zone=zone,
        address=host,
        port=sock.getsockname()[1],
        health_path="/healthz",
        version=os.environ.get("ZONEMESH_DEMO_VERSION", "v1"),
    )
    config = uvicorn.Config(
        make_app(instance, settings, ttl), loop="uvloop", http="httptools", log_level="warning"
    )
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))
