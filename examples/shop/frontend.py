"""Shop frontend (zone a): an async Starlette app that registers itself with HeartbeatClient and calls other
services east-west through its zone gateway (Host: <service>.mesh)."""

from __future__ import annotations

import contextlib
import os

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.listen import bind
from registry import EtcdSettings, HeartbeatClient, Instance, new_instance_id

GATEWAY = os.environ["ZONEMESH_GATEWAY_URL"]  # this zone's gateway, e.g. http://127.0.0.1:8080
ZONE = os.environ.get("ZONEMESH_ZONE", "a")
SOCK = bind("127.0.0.1", int(os.environ.get("PORT", "0") or 0))
http: aiohttp.ClientSession | None = None


async def call(service: str, method: str, path: str, request: Request, **kw) -> tuple[int, dict]:
    """Call another service through the gateway, passing the request id along for tracing."""
    assert http is not None
    headers = {"Host": f"{service}.mesh", "x-request-id": request.headers.get("x-request-id", "")}
    async with http.request(method, GATEWAY + path, headers=headers, **kw) as resp:
        body = await resp.json(content_type=None)
        return resp.status, {**body, "answered_from_zone": resp.headers.get("x-zonemesh-zone")}


async def home(request: Request) -> JSONResponse:
    status, items = await call("catalog", "GET", "/items", request)
    return JSONResponse(
        {"shop": "zonemesh demo", "frontend_zone": ZONE, "catalog": items}, status_code=status
    )


async def checkout(request: Request) -> JSONResponse:
    status, order = await call("orders", "POST", "/orders", request, json={"item": "teapot", "qty": 1})
    return JSONResponse({"frontend_zone": ZONE, "order": order}, status_code=status)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):
    global http
    instance = Instance(
        id=new_instance_id("frontend"),
        service="frontend",
        zone=ZONE,
        address="127.0.0.1",
        port=SOCK.getsockname()[1],
        health_path="/health",
        version="v1",
    )
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    async with HeartbeatClient(instance, EtcdSettings.from_env()):
        yield
    await http.close()


app = Starlette(
    routes=[
        Route("/", home),
        Route("/checkout", checkout, methods=["GET", "POST"]),
        Route("/health", health),
    ],
    lifespan=lifespan,
)

if __name__ == "__main__":
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[SOCK])
