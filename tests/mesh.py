"""Test helpers for the data plane: real upstream servers and real gateway processes on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import aiohttp
from aiohttp import web

from registry.embedded_etcd import free_port
from registry.etcd import EtcdSettings
from registry.heartbeat import HeartbeatClient
from registry.model import Instance, new_instance_id
from tests.conftest import Procs


class Upstream:
    """A real HTTP server (aiohttp) with the behaviours the proxy tests need."""

    def __init__(self, name: str = "up") -> None:
        self.name = name
        self.port = 0
        self.healthy = True
        self.hits = 0
        self.fail_status: int | None = None
        self.seen: list[dict] = []  # method, path and headers of /flaky and /echo requests
        self.runner: web.AppRunner | None = None
        self.heartbeats: list[HeartbeatClient] = []

    async def start(self) -> Upstream:
        app = web.Application(client_max_size=0)
        r = app.router
        r.add_route("*", "/echo{tail:.*}", self.echo)
        r.add_route("*", "/flaky{tail:.*}", self.flaky)
        r.add_get("/bytes/{n}", self.stream_bytes)
        r.add_get("/sized/{n}", self.sized)
        r.add_post("/upload", self.upload)
        r.add_get("/slow/{s}", self.slow)
        r.add_route("*", "/status/{code}", self.status)
        r.add_get("/ws", self.ws)
        r.add_get("/health", self.health)
        r.add_get("/close", self.close)
        r.add_get("/reset", self.reset)
        r.add_get("/midreset", self.midreset)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)  # teardown cuts slow handlers
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def register(
        self,
        settings: EtcdSettings,
        service: str,
        zone: str,
        health_path: str | None = None,
        ttl: int = 5,
        **kw,
    ) -> HeartbeatClient:
        inst = Instance(
            id=new_instance_id(service), service=service, zone=zone, address="127.0.0.1", port=self.port,
            health_path=health_path, **kw,
        )  # fmt: skip
        hb = HeartbeatClient(inst, settings, ttl=ttl)
        assert await hb.register()
        self.heartbeats.append(hb)
        return hb

    async def stop(self) -> None:
        for hb in self.heartbeats:
            await hb.deregister()
        if self.runner:
            await self.runner.cleanup()

    async def flaky(self, request: web.Request) -> web.Response:
        self.hits += 1
        await request.read()
        self.seen.append(
            {"method": request.method, "path": request.raw_path, "headers": dict(request.headers)}
        )
        if self.fail_status:
            return web.Response(status=self.fail_status, text=f"{self.name} failing")
        return web.Response(text=self.name)

    async def echo(self, request: web.Request) -> web.Response:
        self.hits += 1
        body = await request.read()
        self.seen.append(
            {"method": request.method, "path": request.raw_path, "headers": dict(request.headers)}
        )
        return web.json_response(
            {
                "upstream": self.name,
                "method": request.method,
                "path": request.raw_path,
                "headers": [[k.decode().lower(), v.decode()] for k, v in request.raw_headers],
                "body_len": len(body),
            }
        )

    async def stream_bytes(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse()
        await resp.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        while sent < n:
            part = chunk[: min(len(chunk), n - sent)]
            await resp.write(part)
            sent += len(part)
        await resp.write_eof()
        return resp

    async def sized(self, request: web.Request) -> web.Response:
        return web.Response(body=b"y" * int(request.match_info["n"]))

    async def upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        total = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            total += len(chunk)
        return web.json_response({"received": total, "sha256": digest.hexdigest()})

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.match_info["s"]))
        return web.Response(text="slow")

    async def status(self, request: web.Request) -> web.Response:
        self.hits += 1
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code)
        return web.Response(status=code, text=f"status {code} from {self.name}")

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("echo.v1",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data == "close":
                    await ws.close(code=4001, message=b"asked")
                    break
                await ws.send_str(f"{self.name}:{msg.data}")
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503, text="health")

    async def close(self, request: web.Request) -> web.Response:
        resp = web.Response(text="bye")
        resp.force_close()
        return resp

    async def reset(self, request: web.Request) -> web.Response:
        request.transport.abort()  # type: ignore[union-attr]
        await asyncio.sleep(1)
        return web.Response(text="never")

    async def midreset(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-length": "1000000"})
        await resp.prepare(request)
        await resp.write(b"z" * 1000)
        await asyncio.sleep(0.05)
        request.transport.abort()  # type: ignore[union-attr]
        return resp


class GatewayProc:
    """A real ``zonemesh gateway`` process."""

    def __init__(
        self,
        procs: Procs,
        settings: EtcdSettings,
        zone: str,
        *extra: str,
        access_log: bool = False,
        config_file: str | None = None,
    ) -> None:
        self.zone = zone
        self.procs = procs
        self.port = free_port()
        self.admin_port = free_port()
        log_flag = () if access_log else ("--no-access-log",)
        pre = ("--config", config_file) if config_file else ()
        self.proc = procs.zonemesh(
            *pre, "gateway", "--zone", zone, "--listen", f"127.0.0.1:{self.port}", "--admin",
            f"127.0.0.1:{self.admin_port}", *log_flag, *extra, env=settings.env(),
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def ready(self, timeout: float = 20) -> GatewayProc:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    out = self.procs.output(self.proc)[-3000:]
                    raise AssertionError(f"gateway exited {self.proc.returncode}: {out}")
                try:
                    async with s.get(f"{self.admin}/readyz") as r:
                        if r.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("gateway not ready in time")

    async def catalog(self) -> dict:
        async with aiohttp.ClientSession() as s, s.get(f"{self.admin}/v1/catalog") as r:
            return await r.json()

    async def config(self) -> dict:
        async with aiohttp.ClientSession() as s, s.get(f"{self.admin}/v1/config") as r:
            return await r.json()

    async def knows(self, service: str, count: int, zone: str | None = None) -> bool:
        data = await self.catalog()
        zones = data["services"].get(service, {})
        if zone is not None:
            return len(zones.get(zone, [])) == count
        return sum(len(v) for v in zones.values()) == count

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


async def wait_until(fn, timeout: float = 5.0, check=bool):  # noqa: ANN001, ANN201 - any awaitable poll
    """Await ``fn()`` until ``check`` accepts what it returns (then return that); fail the test on timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await fn()
        if check(last):
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


async def start_gateways(
    procs: Procs, settings: EtcdSettings, flags: tuple[str, ...]
) -> tuple[GatewayProc, GatewayProc]:
    """Gateways of zones a and b, ready, each seeing both (so cross-zone requests can be made at once)."""
    a, b = GatewayProc(procs, settings, "a", *flags), GatewayProc(procs, settings, "b", *flags)
    await asyncio.gather(a.ready(), b.ready())
    for gw in (a, b):
        await wait_until(gw.catalog, 5, check=lambda d: len(d["gateways"]) == 2)
    return a, b


class Mesh:
    """Gateways of zones a and b on one etcd prefix, and the upstreams a test registers there."""

    def __init__(self, settings: EtcdSettings, a: GatewayProc, b: GatewayProc) -> None:
        self.settings, self.a, self.b = settings, a, b
        self.upstreams: list[Upstream] = []

    async def upstream(self, service: str, zone: str = "a", name: str | None = None, **kw) -> Upstream:
        """A new upstream registered as ``service`` in ``zone``, once both gateways' catalogs have it."""
        up = await Upstream(name or f"{service}-{zone}-{len(self.upstreams)}").start()
        await up.register(self.settings, service, zone, **kw)
        self.upstreams.append(up)
        count = sum(1 for u in self.upstreams for hb in u.heartbeats if hb.record.service == service)
        for gw in (self.a, self.b):  # both: a request may cross to the other zone's gateway
            await wait_until(lambda gw=gw: gw.knows(service, count), 5)
        return up


async def raw_request(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection and return everything read until the server closes or times out."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            out += chunk
    except (TimeoutError, ConnectionError):
        pass
    writer.close()
    return out


def parse_json_body(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])
