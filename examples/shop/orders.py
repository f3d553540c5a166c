"""Shop orders (zone b only, so calls from zone a cross zones): an aiohttp service registered with
HeartbeatClient. ORDERS_VERSION=v2 runs the canary that the split route sends a share of traffic to."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal

import aiohttp
from aiohttp import web

from gateway.listen import bind
from registry import EtcdSettings, HeartbeatClient, Instance, new_instance_id

GATEWAY = os.environ["ZONEMESH_GATEWAY_URL"]
ZONE = os.environ.get("ZONEMESH_ZONE", "b")
VERSION = os.environ.get("ORDERS_VERSION", "v1")
ids = itertools.count(1000)


async def create(request: web.Request) -> web.Response:
    order = await request.json()
    headers = {"Host": "payments.mesh", "x-request-id": request.headers.get("x-request-id", "")}
    async with request.app["http"].post(f"{GATEWAY}/charge", json={"amount": 24.0}, headers=headers) as resp:
        payment = await resp.json(content_type=None)
    return web.json_response(
        {
            "order_id": next(ids),
            "order": order,
            "orders_version": VERSION,
            "orders_zone": ZONE,
            "payment": payment,
        },
        status=201 if resp.status == 200 else 502,
    )


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def main() -> None:
    sock = bind("127.0.0.1", int(os.environ.get("PORT", "0") or 0))
    app = web.Application()
    app.router.add_post("/orders", create)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    instance = Instance(
        id=new_instance_id("orders"),
        service="orders",
        zone=ZONE,
        address="127.0.0.1",
        port=sock.getsockname()[1],
        health_path="/health",
        version=VERSION,
    )
    async with aiohttp.ClientSession() as http, HeartbeatClient(instance, EtcdSettings.from_env()):
        app["http"] = http
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
