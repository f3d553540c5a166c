"""The zone gateway end to end: real etcd, real gateway processes, real upstream servers, on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid

import aiohttp
import httptools
import pytest

from registry.embedded_etcd import EmbeddedEtcd, free_port
from registry.etcd import EtcdSettings
from tests.conftest import Procs
from tests.mesh import GatewayProc, Mesh, Upstream, parse_json_body, raw_request, start_gateways, wait_until

GW_FLAGS = (
    "--request-timeout", "1.5", "--header-timeout", "1", "--hc-interval", "0.2", "--hc-timeout", "0.5",
    "--hc-healthy", "2", "--hc-unhealthy", "2", "--outlier-consecutive", "3", "--outlier-base-ejection", "2",
    "--max-body-bytes", str(200 * 1024 * 1024), "--max-header-bytes", "8192", "--lease-ttl", "3",
)  # fmt: skip


@pytest.fixture(scope="module")
async def mesh(etcd: EmbeddedEtcd):
    settings = EtcdSettings(endpoints=(etcd.endpoint,), prefix=f"/gw-{uuid.uuid4().hex[:8]}")
    procs = Procs()
    try:
        m = Mesh(settings, *await start_gateways(procs, settings, GW_FLAGS))
        yield m
        for up in m.upstreams:
            await up.stop()
    finally:
        procs.reap()


def svc() -> str:
    return f"s{uuid.uuid4().hex[:8]}"


async def get(url: str, host: str | None = None, **kw) -> tuple[int, dict, bytes]:
    headers = kw.pop("headers", {})
    if host:
        headers["Host"] = host
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers, **kw) as r:
        return r.status, r.headers.copy(), await r.read()


async def test_gateways_register_themselves(mesh: Mesh) -> None:
    async def zones() -> dict:
        return {z: len(v) for z, v in (await mesh.a.catalog())["gateways"].items()}

    await wait_until(zones, 5, check=lambda z: z == {"a": 1, "b": 1})
    data = await mesh.a.catalog()
    assert {z: len(v) for z, v in data["gateways"].items()} == {"a": 1, "b": 1}
    assert data["gateways"]["b"][0]["address"] == f"127.0.0.1:{mesh.b.port}"


async def test_request_crosses_to_the_zone_that_has_the_service(mesh: Mesh) -> None:
    name = svc()
    await mesh.upstream(name, "b", name="only-in-b")
    await wait_for_known(mesh.a, name, 1)
    status, headers, body = await get(f"{mesh.a.url}/echo/x?q=1", host=f"{name}.mesh")
    assert status == 200, body
    data = json.loads(body)
    assert data["upstream"] == "only-in-b" and data["path"] == "/echo/x?q=1"
    assert headers["x-zonemesh-zone"] == "b"
    assert headers["via"] == "1.1 zonemesh-b, 1.1 zonemesh-a"
    sent = dict(data["headers"])
    assert not [h for h in sent if h.startswith("x-zonemesh-")], "hop metadata stays between gateways"
    # Path-prefix routing crosses the same way, with the prefix stripped at the last hop.
    status, _, body = await get(f"{mesh.a.url}/{name}/echo/y")
    assert status == 200 and json.loads(body)["path"] == "/echo/y"


async def test_local_zone_is_preferred(mesh: Mesh) -> None:
    name = svc()
    await mesh.upstream(name, "a", name="local")
    await mesh.upstream(name, "b", name="remote")
    await wait_for_known(mesh.a, name, 2)
    seen = set()
    for _ in range(20):
        _, headers, body = await get(f"{mesh.a.url}/echo", host=f"{name}.mesh")
        seen.add(json.loads(body)["upstream"])
    assert seen == {"local"}
    _, _, body = await get(f"{mesh.b.url}/echo", host=f"{name}.mesh")
    assert json.loads(body)["upstream"] == "remote"


async def test_at_most_one_cross_zone_hop(mesh: Mesh) -> None:
    name = svc()
    await mesh.upstream(name, "b")
    await wait_for_known(mesh.a, name, 1)
    status, _, body = await get(f"{mesh.a.url}/echo", host=f"{name}.mesh", headers={"x-zonemesh-hop": "c"})
    assert status == 503
    err = json.loads(body)
    assert err["error"] == "no_healthy_upstream" and "in this zone" in err["message"]


async def test_balances_across_local_instances(mesh: Mesh) -> None:
    name = svc()
    ups = [await mesh.upstream(name, "a", name=f"i{n}") for n in range(3)]
    await wait_for_known(mesh.a, name, 3)
    async with aiohttp.ClientSession() as s:
        for _ in range(60):
            async with s.get(f"{mesh.a.url}/echo", headers={"Host": f"{name}.mesh"}) as r:
                assert r.status == 200
    assert all(up.hits >= 8 for up in ups), [up.hits for up in ups]


async def test_killed_instance_traffic_moves_without_errors(mesh: Mesh, procs: Procs) -> None:
    name = svc()
    env = mesh.settings.env()
    victims = [
        procs.zonemesh("demo-service", "--service", name, "--zone", "a", "--ttl", "3", env=env)
        for _ in range(2)
    ]
    await wait_for_known(mesh.a, name, 2)
    statuses = []
    async with aiohttp.ClientSession() as s:
        for i in range(150):
            if i == 30:
                os.kill(victims[0].pid, signal.SIGKILL)
            async with s.get(f"{mesh.a.url}/{name}/x") as r:
                statuses.append(r.status)
                await r.read()
    assert statuses.count(200) == 150, [s for s in statuses if s != 200]
    await wait_for_known(mesh.a, name, 1, timeout=6)  # the lease expires and the instance leaves


async def test_deregistered_instance_finishes_in_flight_requests(mesh: Mesh) -> None:
    name = svc()
    up = await mesh.upstream(name, "a")
    await wait_for_known(mesh.a, name, 1)
    request = asyncio.ensure_future(get(f"{mesh.a.url}/slow/0.8", host=f"{name}.mesh"))
    await asyncio.sleep(0.2)
    await up.heartbeats[0].deregister()
    await wait_for_known(mesh.a, name, 0)
    status, _, body = await request
    assert status == 200 and body == b"slow"
    status, _, body = await get(f"{mesh.a.url}/echo", host=f"{name}.mesh")
    assert status == 503 and json.loads(body)["error"] == "no_healthy_upstream"


async def test_streams_100mb_down_and_up_with_bounded_memory(mesh: Mesh) -> None:
    name = svc()
    await mesh.upstream(name, "a")
    await wait_for_known(mesh.a, name, 1)
    size = 100 * 1024 * 1024
    base = mesh.a.rss_kb()
    peak = base
    got = 0
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{mesh.a.url}/bytes/{size}", headers={"Host": f"{name}.mesh"}) as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(256 * 1024):
                got += len(chunk)
                if got % (8 * 1024 * 1024) < 256 * 1024:
                    peak = max(peak, mesh.a.rss_kb())
                    await asyncio.sleep(0.01)  # a slowish client: the gateway must not buffer ahead
        assert got == size

        async def body():
            block = os.urandom(1024 * 1024)
            for _ in range(100):
                yield block

        async with s.post(f"{mesh.a.url}/upload", data=body(), headers={"Host": f"{name}.mesh"}) as r:
            assert r.status == 200
            assert (await r.json())["received"] == size
        peak = max(peak, mesh.a.rss_kb())
    assert peak - base < 40 * 1024, f"gateway RSS grew by {(peak - base) // 1024} MiB"


async def test_websocket_echo_through_the_gateway(mesh: Mesh) -> None:
    name = svc()
    await mesh.upstream(name, "b", name="wsb")
    await wait_for_known(mesh.a, name, 1)
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(
            f"{mesh.a.url}/ws", headers={"Host": f"{name}.mesh"}, protocols=("echo.v1",)
        ) as ws:
            assert ws.protocol == "echo.v1"
            await ws.send_str("hello")
            assert (await ws.receive_str(timeout=5)) == "wsb:hello"
            await ws.send_bytes(b"abc")
            assert (await ws.receive_bytes(timeout=5)) == b"cba"
            await ws.send_str("close")
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4001


async def test_websocket_to_unknown_service_is_refused(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(f"{mesh.a.url}/ws", headers={"Host": f"{svc()}.mesh"})
        assert info.value.status == 503


async def test_hop_by_hop_stripped_and_forwarding_headers_set(mesh: Mesh) -> None:
    name = svc()
    await mesh.upstream(name, "a")
    await wait_for_known(mesh.a, name, 1)
    headers = {
        "Connection": "keep-alive, x-secret",
        "x-secret": "1",
        "keep-alive": "timeout=5",
        "te": "trailers",
        "proxy-authorization": "Basic abc",
        "x-request-id": "my-trace-123",
        "x-forwarded-for": "203.0.113.9",
        "x-custom": "kept",
    }
    status, resp_headers, body = await get(f"{mesh.a.url}/echo", host=f"{name}.mesh", headers=headers)
    assert status == 200
    sent = dict(json.loads(body)["headers"])
    for gone in ("x-secret", "keep-alive", "te", "proxy-authorization"):
        assert gone not in sent
    assert sent["x-custom"] == "kept"
    assert sent["x-request-id"] == "my-trace-123" and resp_headers["x-request-id"] == "my-trace-123"
    assert sent["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert sent["x-forwarded-proto"] == "http" and sent["x-forwarded-host"] == f"{name}.mesh"
    assert sent["via"] == "1.1 zonemesh-a"
    # An invalid incoming request id is replaced.
    _, resp_headers, body = await get(
        f"{mesh.a.url}/echo", host=f"{name}.mesh", headers={"x-request-id": "bad id!"}
    )
    rid = resp_headers["x-request-id"]
    assert rid != "bad id!" and dict(json.loads(body)["headers"])["x-request-id"] == rid


async def test_head_204_304_chunked_and_connection_close(mesh: Mesh) -> None:
    name = svc()
    await mesh.upstream(name, "a")
    await wait_for_known(mesh.a, name, 1)
    host = {"Host": f"{name}.mesh"}
    async with aiohttp.ClientSession() as s:
        async with s.head(f"{mesh.a.url}/sized/5000", headers=host) as r:
            assert r.status == 200 and r.headers["content-length"] == "5000" and await r.read() == b""
        for code in (204, 304):
            async with s.get(f"{mesh.a.url}/status/{code}", headers=host) as r:
                assert r.status == code and await r.read() == b""
        async with s.get(f"{mesh.a.url}/bytes/300000", headers=host) as r:
            assert r.status == 200 and len(await r.read()) == 300000
        for _ in range(3):  # the upstream closes after each: the gateway must not reuse that connection
            async with s.get(f"{mesh.a.url}/close", headers=host) as r:
                assert r.status == 200 and await r.text() == "bye"
        # Keep-alive on the client side survives all of the above on one session.
        async with s.get(f"{mesh.a.url}/echo", headers=host) as r:
            assert r.status == 200


def parse_responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every HTTP/1.1 response in ``raw`` (as a client reads them off one connection), bodies de-chunked."""
    out: list[tuple[int, dict[str, str], bytes]] = []

    class Sink:
        def on_message_begin(self) -> None:
            self.headers: dict[str, str] = {}
            self.body = b""

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.decode().lower()] = value.decode()

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            out.append((parser.get_status_code(), self.headers, self.body))

    parser = httptools.HttpResponseParser(Sink())
    parser.feed_data(raw)
    if b"transfer-encoding: chunked" not in raw.lower() and out == [] and raw:
        parser.feed_data(b"")  # a close-delimited body ends with the connection
    return out


async def test_client_connection_pipelining_http10_and_chunking(mesh: Mesh) -> None:
    name = svc()
    await mesh.upstream(name, "a")
    await wait_for_known(mesh.a, name, 1)
    host = f"Host: {name}.mesh\r\n"
    # Pipelined requests are answered in order on one connection; the last asks to close it.
    raw = await raw_request(
        mesh.a.port,
        f"GET /echo/1 HTTP/1.1\r\n{host}\r\nGET /echo/2 HTTP/1.1\r\n{host}\r\n"
        f"GET /echo/3 HTTP/1.1\r\n{host}Connection: close\r\n\r\n".encode(),
    )
    responses = parse_responses(raw)
    assert [json.loads(body)["path"] for _, _, body in responses] == ["/echo/1", "/echo/2", "/echo/3"]
    assert responses[-1][1]["connection"] == "close"
    # A streamed (chunked) upstream body goes to an HTTP/1.1 client chunked ...
    raw = await raw_request(
        mesh.a.port, f"GET /bytes/150000 HTTP/1.1\r\n{host}Connection: close\r\n\r\n".encode()
    )
    [(status, headers, body)] = parse_responses(raw)
    assert status == 200 and headers["transfer-encoding"] == "chunked" and body == b"x" * 150000
    # ... and to an HTTP/1.0 client as a body that ends with the connection.
    raw = await raw_request(mesh.a.port, f"GET /bytes/150000 HTTP/1.0\r\n{host}\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower() and body == b"x" * 150000
    # HTTP/1.0 with keep-alive keeps the connection for a second request.
    raw = await raw_request(
        mesh.a.port,
        f"GET /echo/a HTTP/1.0\r\n{host}Connection: keep-alive\r\n\r\n"
        f"GET /echo/b HTTP/1.0\r\n{host}\r\n".encode(),
    )
    assert raw.count(b"HTTP/1.1 200") == 2 and b"connection: keep-alive" in raw.lower()


async def test_idle_keepalive_connection_is_closed(settings: EtcdSettings, procs: Procs) -> None:
    gw = await GatewayProc(procs, settings, "a", "--keepalive-timeout", "1").ready()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: nothing.mesh\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 503")  # no instance of that service
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    rest = await asyncio.wait_for(reader.read(), 5)  # the JSON body, then EOF once idle for 1 s
    assert rest.startswith(b"{") and 0.8 < loop.time() - t0 < 3
    writer.close()


async def test_sigterm_drains_in_flight_requests_within_the_drain_timeout(
    settings: EtcdSettings, procs: Procs
) -> None:
    up = await Upstream("drain").start()
    try:
        await up.register(settings, "drain", "a")
        gw = await GatewayProc(
            procs, settings, "a", "--drain-timeout", "1.5", "--request-timeout", "60"
        ).ready()
        await wait_for_known(gw, "drain", 1)
        loop = asyncio.get_running_loop()
        assert (await get(f"{gw.url}/echo", host="drain.mesh"))[
            0
        ] == 200  # leaves an idle upstream connection
        # stuck takes that connection (answered from its callback), quick gets a new one (served by a task)
        stuck = asyncio.ensure_future(get(f"{gw.url}/slow/30", host="drain.mesh"))
        await asyncio.sleep(0.05)
        quick = asyncio.ensure_future(get(f"{gw.url}/slow/0.5", host="drain.mesh"))
        await asyncio.sleep(0.2)
        t0 = loop.time()
        gw.proc.send_signal(signal.SIGTERM)
        status, _, body = await quick
        assert status == 200 and body == b"slow"  # finished during the drain
        status, _, body = await stuck  # cut when the drain time is up, with an answer
        assert status == 503 and json.loads(body)["error"] == "shutting_down"
        assert 1.2 < loop.time() - t0 < 6
        assert await loop.run_in_executor(None, gw.proc.wait, 10) == 0
    finally:
        await up.stop()


async def test_expect_100_continue(mesh: Mesh) -> None:
    name = svc()
    await mesh.upstream(name, "a")
    await wait_for_known(mesh.a, name, 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.a.port)
    writer.write(
        f"POST /upload HTTP/1.1\r\nHost: {name}.mesh\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_absolute_form_uri_never_makes_an_open_proxy(mesh: Mesh, etcd: EmbeddedEtcd) -> None:
    raw = f"GET http://{etcd.endpoint}/v3/kv/range HTTP/1.1\r\nHost: {etcd.endpoint}\r\n\r\n".encode()
    out = await raw_request(mesh.a.port, raw, read_timeout=2)
    assert out.startswith(b"HTTP/1.1 404") and parse_json_body(out)["error"] == "no_route"


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (
            b"GET /x HTTP/1.1\r\nHost: q.mesh\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n",
            431,
            "headers_too_large",
        ),
        (
            b"GET /x HTTP/1.1\r\nHost: q.mesh\r\n"
            + b"".join(b"X-%d: vvvvvvvvvvvvvvvv\r\n" % i for i in range(500))
            + b"\r\n",
            431,
            "headers_too_large",
        ),
        (
            b"POST /x HTTP/1.1\r\nHost: q.mesh\r\nContent-Length: 999999999999\r\n\r\n",
            413,
            "payload_too_large",
        ),
        (
            b"POST /x HTTP/1.1\r\nHost: q.mesh\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            b"GET /x HTTP/1.1\r\nHost: q.mesh\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            400,
            "bad_request",
        ),
        (b"GARBAGE\x00\x01 / HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (b"GET /x HTTP/1.1\r\nHost: nothing-here.example\r\n\r\n", 404, "no_route"),
    ],
    ids=["big-header", "many-headers", "body-too-large", "cl-and-te", "two-cl", "malformed", "no-route"],
)
async def test_bad_requests_get_their_status(mesh: Mesh, raw: bytes, status: int, code: str) -> None:
    out = await raw_request(mesh.a.port, raw, read_timeout=3)
    assert out.startswith(f"HTTP/1.1 {status}".encode()), out[:200]
    assert parse_json_body(out)["error"] == code


async def test_chunked_body_over_the_limit_is_413(settings: EtcdSettings, procs: Procs) -> None:
    gw = await GatewayProc(procs, settings, "a", "--max-body-bytes", "1000").ready()
    up = await Upstream().start()
    await up.register(settings, "lim", "a")
    try:
        await wait_for_known(gw, "lim", 1)

        async def body():
            for _ in range(10):
                yield b"q" * 500

        async with aiohttp.ClientSession() as s:
            async with s.post(f"{gw.url}/upload", data=body(), headers={"Host": "lim.mesh"}) as r:
                assert r.status == 413 and (await r.json())["error"] == "payload_too_large"
            async with s.post(f"{gw.url}/upload", data=b"q" * 900, headers={"Host": "lim.mesh"}) as r:
                assert r.status == 200 and (await r.json())["received"] == 900
    finally:
        await up.stop()


async def test_slowloris_gets_408(mesh: Mesh) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.a.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: q.mesh\r\n")
    await writer.drain()
    for _ in range(4):  # trickle a header byte at a time, never finishing the head
        await asyncio.sleep(0.3)
        try:
            writer.write(b"X")
        except ConnectionError:
            break
    out = await asyncio.wait_for(reader.read(), 5)
    assert out.startswith(b"HTTP/1.1 408"), out
    writer.close()


async def test_upstream_failures_map_to_502_504(mesh: Mesh) -> None:
    names = [svc() for _ in range(3)]  # one service each: outlier ejection of one case must not mask the next
    for name in names:
        await mesh.upstream(name, "a")
        await wait_for_known(mesh.a, name, 1)
    status, _, body = await get(f"{mesh.a.url}/slow/3", host=f"{names[0]}.mesh")
    assert status == 504 and json.loads(body)["error"] == "upstream_timeout"
    status, _, body = await get(f"{mesh.a.url}/reset", host=f"{names[1]}.mesh")
    assert status == 502 and json.loads(body)["error"] == "upstream_reset"
    # A reset after the response started: the client sees a truncated body, never a clean short response.
    with pytest.raises(aiohttp.ClientPayloadError):
        await get(f"{mesh.a.url}/midreset", host=f"{names[2]}.mesh")


async def test_dead_registered_instance_is_502_connect_failed(mesh: Mesh) -> None:
    name = svc()
    up = await mesh.upstream(name, "a")
    await up.runner.cleanup()  # the server is gone, its registration is not
    await wait_for_known(mesh.a, name, 1)
    status, _, body = await get(f"{mesh.a.url}/echo", host=f"{name}.mesh")
    err = json.loads(body)
    assert status == 502 and err["error"] == "upstream_connect_failed" and err["request_id"]


async def test_active_health_check_takes_instance_out_and_back(mesh: Mesh) -> None:
    name = svc()
    sick = await mesh.upstream(name, "a", name="sick", health_path="/health")
    await mesh.upstream(name, "a", name="fine", health_path="/health")
    await wait_for_known(mesh.a, name, 2)
    sick.healthy = False

    async def healthy_count() -> int:
        data = await mesh.a.catalog()
        return sum(ep["healthy"] for ep in data["services"][name]["a"])

    await wait_until(healthy_count, 3, check=lambda n: n == 1)
    for _ in range(10):
        _, _, body = await get(f"{mesh.a.url}/echo", host=f"{name}.mesh")
        assert json.loads(body)["upstream"] == "fine"
    sick.healthy = True
    await wait_until(healthy_count, 3, check=lambda n: n == 2)


async def test_passive_outlier_ejection(mesh: Mesh) -> None:
    name = svc()
    bad = await mesh.upstream(name, "a", name="bad")
    await wait_for_known(mesh.a, name, 1)
    for _ in range(3):
        status, _, _ = await get(f"{mesh.a.url}/status/500", host=f"{name}.mesh")
        assert status == 500
    data = await mesh.a.catalog()
    (ep,) = data["services"][name]["a"]
    assert ep["ejections"] == 1 and ep["ejected_for_s"] > 0
    status, _, body = await get(f"{mesh.a.url}/status/200", host=f"{name}.mesh")
    assert status == 503 and json.loads(body)["error"] == "no_healthy_upstream"
    assert bad.hits == 3
    await asyncio.sleep(2.1)  # base ejection time in this mesh
    status, _, _ = await get(f"{mesh.a.url}/status/200", host=f"{name}.mesh")
    assert status == 200


async def test_admin_endpoints(mesh: Mesh) -> None:
    name = svc()
    await mesh.upstream(name, "a")
    await wait_for_known(mesh.a, name, 1)
    await get(f"{mesh.a.url}/echo", host=f"{name}.mesh")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{mesh.a.admin}/healthz") as r:
            assert r.status == 200 and (await r.json())["zone"] == "a"
        async with s.get(f"{mesh.a.admin}/metrics") as r:
            text = await r.text()
        assert f'zonemesh_requests_total{{service="{name}",zone="a",code="2xx"}} 1' in text
        assert f'zonemesh_request_duration_seconds_count{{service="{name}"}} 1' in text
        for metric in ("zonemesh_upstream_connects_total", "zonemesh_catalog_revision", "zonemesh_catalog_instances",
                       "zonemesh_outlier_ejections_total", "zonemesh_upstream_reused_total"):  # fmt: skip
            assert f"\n{metric} " in text
        async with s.get(f"{mesh.a.admin}/v1/config") as r:
            cfg = await r.json()
        assert (
            cfg["zone"] == "a"
            and cfg["catalog"]["revision"] > 0
            and cfg["limits"]["max_header_bytes"] == 8192
        )


async def test_two_workers_share_the_listener(settings: EtcdSettings, procs: Procs) -> None:
    gw = await GatewayProc(procs, settings, "a", "--workers", "2").ready()
    up = await Upstream().start()
    await up.register(settings, "two", "a")
    try:
        await wait_for_known(gw, "two", 1)
        await asyncio.sleep(0.5)  # the second worker syncs its own catalog
        async with aiohttp.ClientSession() as s:
            for _ in range(40):
                async with s.get(f"{gw.url}/echo", headers={"Host": "two.mesh", "Connection": "close"}) as r:
                    assert r.status == 200
        # One gateway record for the whole process group; metrics count the requests of every worker.
        data = await gw.catalog()
        assert len(data["gateways"]["a"]) == 1
        async with aiohttp.ClientSession() as s, s.get(f"{gw.admin}/metrics") as r:
            text = await r.text()
        assert 'zonemesh_requests_total{service="two",zone="a",code="2xx"} 40' in text
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(10) == 0
    finally:
        await up.stop()


async def test_gateway_flags_are_validated() -> None:
    from tests.conftest import run_cli

    for args, flag in (
        (["--listen", "nope"], "--listen"),
        (["--balancer", "magic"], "--balancer"),
        (["--max-header-bytes", "10"], "--max-header-bytes"),
        (["--listen", "0.0.0.0:0"], "--advertise"),
        (["--zone", "A_B"], "--zone"),
    ):
        argv = ["gateway", "--zone", "a", "--etcd", f"127.0.0.1:{free_port()}", *args]
        res = await asyncio.to_thread(run_cli, *argv)
        assert res.returncode == 2 and flag in res.stderr and len(res.stderr.strip().splitlines()) == 1, (
            res.stderr
        )


async def wait_for_known(gw: GatewayProc, service: str, count: int, timeout: float = 5) -> None:
    await wait_until(lambda: gw.knows(service, count), timeout)


async def test_etcd_outage_keeps_traffic_flowing_and_access_log_is_json(tmp_path, procs: Procs) -> None:
    server = EmbeddedEtcd(tmp_path / "etcd")
    server.start()
    settings = EtcdSettings(endpoints=(server.endpoint,))
    up = await Upstream("steady").start()
    try:
        gw = GatewayProc(procs, settings, "a", access_log=True)
        await gw.ready()
        await up.register(settings, "steady", "a", ttl=3)
        await wait_for_known(gw, "steady", 1)
        server.stop(kill=True)
        await wait_until(gw.catalog, 5, check=lambda d: d["stale"])
        await asyncio.sleep(3.5)  # past every lease TTL: without etcd, the last snapshot stays in force
        for _ in range(5):
            status, headers, _ = await get(
                f"{gw.url}/echo", host="steady.mesh", headers={"x-request-id": "outage-1"}
            )
            assert status == 200
        async with aiohttp.ClientSession() as s, s.get(f"{gw.admin}/readyz") as r:
            assert r.status == 200 and (await r.json())["stale"] is True
        server.start()
        await wait_until(gw.catalog, 10, check=lambda d: not d["stale"])
    finally:
        server.cleanup()
        await up.stop()
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(10)
    entries = [json.loads(line) for line in procs.output(gw.proc).splitlines() if line.startswith("{")]
    hits = [e for e in entries if e["request_id"] == "outage-1"]
    assert len(hits) == 5
    assert hits[0]["status"] == 200 and hits[0]["service"] == "steady" and hits[0]["upstream_zone"] == "a"
    assert hits[0]["method"] == "GET" and hits[0]["duration_ms"] > 0


async def test_restart_during_etcd_outage_serves_the_disk_snapshot(tmp_path, procs: Procs) -> None:
    server = EmbeddedEtcd(tmp_path / "etcd")
    server.start()
    settings = EtcdSettings(endpoints=(server.endpoint,))
    snapdir = tmp_path / "snap"
    up = await Upstream("survivor").start()
    try:
        await up.register(settings, "steady", "a", ttl=30)
        from policy.store import PolicyStore

        store = PolicyStore(settings)
        await store.put("Route", "hello", {"match": {"hosts": ["hello.example.com"]},
                                           "direct_response": {"status": 200, "body": "from policy"}})  # fmt: skip
        await store.close()
        gw = await GatewayProc(procs, settings, "a", "--snapshot-dir", str(snapdir)).ready()
        await wait_for_known(gw, "steady", 1)
        await wait_until(lambda: asyncio.sleep(0, (snapdir / "catalog.json").exists()
                                               and (snapdir / "policy.json").exists()), 5)  # fmt: skip
        await asyncio.sleep(1.2)  # snapshots are written at most once a second
        gw.proc.send_signal(signal.SIGTERM)
        gw.proc.wait(10)
        server.stop(kill=True)
        # A fresh gateway while etcd is down: after the grace period it serves the snapshot, and says so.
        gw2 = await GatewayProc(procs, settings, "a", "--snapshot-dir", str(snapdir)).ready(timeout=15)
        async with aiohttp.ClientSession() as s, s.get(f"{gw2.admin}/readyz") as r:
            ready = await r.json()
        assert ready["stale"] is True and ready["from_snapshot"] is True
        status, _, body = await get(f"{gw2.url}/echo", host="steady.mesh")
        assert status == 200 and json.loads(body)["upstream"] == "survivor"
        status, _, body = await get(f"{gw2.url}/", host="hello.example.com")
        assert status == 200 and body == b"from policy"
        server.start()

        async def readyz() -> dict:
            async with aiohttp.ClientSession() as s, s.get(f"{gw2.admin}/readyz") as r:
                return await r.json()

        # Back in sync with etcd: both the catalog and the policy leave the snapshot behind.
        await wait_until(readyz, 10, check=lambda d: not d["stale"] and not d["from_snapshot"])
    finally:
        await up.stop()
        server.cleanup()
