"""Policy end to end: real etcd, gateways, control plane and upstreams; every feature through real requests."""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid

import aiohttp
import pytest

from policy.store import PolicyStore
from registry.embedded_etcd import EmbeddedEtcd, free_port
from registry.etcd import EtcdSettings
from registry.heartbeat import HeartbeatClient
from registry.keys import Keys
from registry.model import Instance, new_instance_id
from tests.conftest import Procs, run_cli, wait_for
from tests.mesh import GatewayProc, Mesh, raw_request, start_gateways, wait_until

GW_FLAGS = ("--hc-interval", "0.2", "--outlier-consecutive", "50", "--lease-ttl", "3")


class PolicyMesh(Mesh):
    def __init__(self, settings: EtcdSettings, etcd: EmbeddedEtcd, a: GatewayProc, b: GatewayProc) -> None:
        super().__init__(settings, a, b)
        self.etcd = etcd
        self.store = PolicyStore(settings)
        self.keys = Keys(settings.prefix)

    async def put(self, kind: str, name: str, spec: dict) -> int:
        """Write through the store and wait until both gateways have that revision in force."""
        _, revision = await self.store.put(kind, name, spec)
        await self.applied(revision)
        return revision

    async def applied(self, revision: int) -> float:
        start = time.monotonic()
        for gw in (self.a, self.b):
            await wait_until(lambda gw=gw: _rev(gw), 5, check=lambda r: r >= revision)
        return time.monotonic() - start


async def _rev(gw: GatewayProc) -> int:
    return (await gw.config())["policy"]["revision"]


@pytest.fixture(scope="module")
async def pm(etcd: EmbeddedEtcd):
    settings = EtcdSettings(endpoints=(etcd.endpoint,), prefix=f"/pol-{uuid.uuid4().hex[:8]}")
    procs = Procs()
    try:
        m = PolicyMesh(settings, etcd, *await start_gateways(procs, settings, GW_FLAGS))
        yield m
        for up in m.upstreams:
            await up.stop()
        await m.store.close()
    finally:
        procs.reap()


def uid(prefix: str = "p") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def request(url: str, method: str = "GET", **kw) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
    async with aiohttp.ClientSession() as s, s.request(method, url, allow_redirects=False, **kw) as r:
        return r.status, r.headers.copy(), await r.read()


async def test_weighted_split_over_1000_requests(pm: PolicyMesh) -> None:
    v1, v2, host = uid("v"), uid("v"), f"{uid('h')}.example.com"
    await pm.upstream(v1, name="v1")
    await pm.upstream(v2, name="v2")
    await pm.put("Route", uid("r"), {"match": {"hosts": [host]},
                                     "destinations": [{"service": v1, "weight": 80}, {"service": v2, "weight": 20}]})  # fmt: skip
    counts: collections.Counter[bytes] = collections.Counter()
    async with aiohttp.ClientSession() as s:
        for _ in range(1000):
            async with s.get(f"{pm.a.url}/flaky", headers={"Host": host}) as r:
                assert r.status == 200
                counts[await r.read()] += 1
    assert counts[b"v1"] + counts[b"v2"] == 1000
    assert 750 <= counts[b"v1"] <= 850, counts  # 80% +- 5 points


async def test_subset_by_version_and_cross_zone_delivery(pm: PolicyMesh) -> None:
    svc, host = uid("s"), f"{uid('h')}.example.com"
    await pm.upstream(svc, "a", name="a-v1", version="v1")
    await pm.upstream(svc, "b", name="b-v2", version="v2")
    await pm.put("Route", uid("r"), {"match": {"hosts": [host]},
                                     "destinations": [{"service": svc, "subset": {"version": "v2"}}]})  # fmt: skip
    for _ in range(5):
        status, headers, body = await request(f"{pm.a.url}/flaky", headers={"Host": host})
        assert status == 200 and body == b"b-v2"  # only zone b has v2: the first gateway's choice is kept
        assert headers["x-zonemesh-zone"] == "b"


async def test_match_on_path_method_headers_query_and_priority(pm: PolicyMesh) -> None:
    svc_a, svc_b, host = uid("s"), uid("s"), f"{uid('h')}.example.com"
    await pm.upstream(svc_a, name="A")
    await pm.upstream(svc_b, name="B")
    await pm.put("Route", uid("gen"), {"match": {"hosts": [host]}, "destinations": [{"service": svc_a}]})
    await pm.put("Route", uid("spec"), {
        "match": {"hosts": [host], "path": {"prefix": "/flaky/beta"}, "methods": ["POST"],
                  "headers": [{"name": "x-canary", "exact": "yes"}], "query": [{"name": "u", "regex": "[0-9]+"}]},
        "destinations": [{"service": svc_b}],
    })  # fmt: skip
    url = f"{pm.a.url}/flaky/beta?u=42"
    assert (await request(url, "POST", headers={"Host": host, "x-canary": "yes"}))[2] == b"B"
    assert (await request(url, "GET", headers={"Host": host, "x-canary": "yes"}))[2] == b"A"
    assert (await request(url, "POST", headers={"Host": host}))[2] == b"A"
    assert (await request(f"{pm.a.url}/flaky/beta?u=x", "POST", headers={"Host": host, "x-canary": "yes"}))[
        2
    ] == b"A"
    # A higher priority wins over specificity.
    await pm.put(
        "Route",
        uid("top"),
        {"priority": 10, "match": {"hosts": [host]}, "destinations": [{"service": svc_b}]},
    )
    assert (await request(f"{pm.a.url}/flaky", headers={"Host": host}))[2] == b"B"


async def test_rewrite_and_header_operations(pm: PolicyMesh) -> None:
    svc, host = uid("s"), f"{uid('h')}.example.com"
    up = await pm.upstream(svc)
    await pm.put("Route", uid("r"), {
        "match": {"hosts": [host], "path": {"prefix": "/api/v1/"}},
        "destinations": [{"service": svc}],
        "rewrite": {"prefix": "/echo/"},
        "request_headers": {"set": {"x-env": "prod"}, "add": {"x-added": "1"}, "remove": ["x-drop"]},
        "response_headers": {"set": {"x-route": "r"}, "remove": ["server"]},
    })  # fmt: skip
    status, headers, body = await request(f"{pm.a.url}/api/v1/items?q=1", headers={"Host": host, "x-drop": "secret",
                                                                                   "x-env": "dev"})  # fmt: skip
    assert status == 200
    seen = up.seen[-1]
    assert seen["path"] == "/echo/items?q=1"
    assert (
        seen["headers"]["x-env"] == "prod"
        and seen["headers"]["x-added"] == "1"
        and "x-drop" not in seen["headers"]
    )
    assert headers["x-route"] == "r" and "server" not in headers


async def test_redirect_and_direct_response(pm: PolicyMesh) -> None:
    host = f"{uid('h')}.example.com"
    await pm.put("Route", uid("r"), {"match": {"hosts": [host], "path": {"prefix": "/old"}},
                                     "redirect": {"path": "/new", "status": 301, "scheme": "https"}})  # fmt: skip
    await pm.put("Route", uid("r"), {"match": {"hosts": [host], "path": {"exact": "/ping"}},
                                     "direct_response": {"status": 200, "body": "pong", "headers": {"x-d": "1"}}})  # fmt: skip
    status, headers, _ = await request(f"{pm.a.url}/old/x?a=1", headers={"Host": host})
    assert status == 301 and headers["location"] == f"https://{host}/new?a=1"
    status, headers, body = await request(f"{pm.a.url}/ping", headers={"Host": host})
    assert status == 200 and body == b"pong" and headers["x-d"] == "1"


async def test_retries_hit_another_instance(pm: PolicyMesh) -> None:
    svc = uid("s")
    bad = await pm.upstream(svc, name="bad")
    good = await pm.upstream(svc, name="good")
    bad.fail_status = 503
    await pm.put("Service", svc, {"retries": {"attempts": 2, "retry_on": ["5xx"]}, "balancer": "round_robin"})
    for _ in range(20):
        status, _, body = await request(f"{pm.a.url}/flaky", headers={"Host": f"{svc}.mesh"})
        assert status == 200 and body == b"good"
    assert bad.hits >= 5 and good.hits == 20
    # Not idempotent: POST is not retried unless the policy allows it.
    statuses = collections.Counter()
    for _ in range(10):
        statuses[(await request(f"{pm.a.url}/flaky", "POST", headers={"Host": f"{svc}.mesh"}))[0]] += 1
    assert statuses[503] >= 3
    await pm.put(
        "Service", svc, {"retries": {"attempts": 2, "retry_on": ["5xx"], "allow_non_idempotent": True}}
    )
    for _ in range(10):
        assert (await request(f"{pm.a.url}/flaky", "POST", headers={"Host": f"{svc}.mesh"}))[0] == 200


async def test_retriable_status_codes_and_per_try_timeout(pm: PolicyMesh) -> None:
    svc = uid("s")
    bad = await pm.upstream(svc, name="bad")
    await pm.upstream(svc, name="good")
    bad.fail_status = 409
    await pm.put("Service", svc, {"balancer": "round_robin", "retries": {
        "attempts": 1, "retry_on": ["retriable-status-codes", "5xx"], "retriable_status_codes": [409],
        "per_try_timeout": "300ms"}})  # fmt: skip
    for _ in range(6):
        status, _, body = await request(f"{pm.a.url}/flaky", headers={"Host": f"{svc}.mesh"})
        assert status == 200 and body == b"good"


async def test_a_kept_alive_upstream_connection_the_upstream_dropped_is_retried_on_a_fresh_one(
    pm: PolicyMesh,
) -> None:
    """The upstream answers each connection's first request and drops the connection at its second; with
    retries off, only the rule for kept-alive connections (the upstream may close them any time) saves it."""
    name, connections, dropped = uid("s"), [], []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
            dropped.append(await reader.readuntil(b"\r\n\r\n"))
        except asyncio.IncompleteReadError:
            pass  # the gateway closed it (at the end)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    inst = Instance(id=new_instance_id(name), service=name, zone="a", address="127.0.0.1",
                    port=server.sockets[0].getsockname()[1])  # fmt: skip
    try:
        await pm.put("Service", name, {"retries": {"attempts": 0}})
        async with HeartbeatClient(inst, pm.settings, ttl=5):
            await wait_until(lambda: pm.a.knows(name, 1), 5)
            for _ in range(3):  # each after the first goes out on a connection the upstream then drops
                status, _, body = await request(f"{pm.a.url}/x", headers={"Host": f"{name}.mesh"})
                assert (status, body) == (200, b"first")
            assert len(dropped) == 2 and len(connections) == 3  # requests 2 and 3 each went out twice
    finally:
        server.close()


async def test_circuit_breaker_sheds_load(pm: PolicyMesh) -> None:
    svc = uid("s")
    await pm.upstream(svc)
    await pm.put("Service", svc, {"circuit_breaker": {"max_requests": 2}})
    results = await asyncio.gather(*(request(f"{pm.a.url}/slow/0.5", headers={"Host": f"{svc}.mesh"})
                                     for _ in range(6)))  # fmt: skip
    statuses = collections.Counter(r[0] for r in results)
    assert statuses[200] == 2 and statuses[503] == 4, statuses
    shed = [json.loads(r[2]) for r in results if r[0] == 503]
    assert all(e["error"] == "circuit_open" for e in shed)


async def test_rate_limit_429_with_retry_after(pm: PolicyMesh) -> None:
    host = f"{uid('h')}.example.com"
    svc = uid("s")
    await pm.upstream(svc)
    await pm.put("Route", uid("r"), {"match": {"hosts": [host]}, "destinations": [{"service": svc}],
                                     "rate_limit": {"requests_per_second": 2, "burst": 5, "key": "header:x-user"}})  # fmt: skip
    alice = [await request(f"{pm.a.url}/flaky", headers={"Host": host, "x-user": "alice"}) for _ in range(8)]
    assert [r[0] for r in alice] == [200] * 5 + [429] * 3
    assert int(alice[-1][1]["retry-after"]) >= 1 and json.loads(alice[-1][2])["error"] == "rate_limited"
    assert (await request(f"{pm.a.url}/flaky", headers={"Host": host, "x-user": "bob"}))[0] == 200
    await asyncio.sleep(0.6)  # 2 tokens/s: one is back
    assert (await request(f"{pm.a.url}/flaky", headers={"Host": host, "x-user": "alice"}))[0] == 200


async def test_fault_injection(pm: PolicyMesh) -> None:
    host = f"{uid('h')}.example.com"
    svc = uid("s")
    up = await pm.upstream(svc)
    await pm.put("Route", uid("r"), {"match": {"hosts": [host], "path": {"prefix": "/flaky/abort"}},
                                     "destinations": [{"service": svc}],
                                     "fault": {"abort": {"percent": 100, "status": 418}}})  # fmt: skip
    await pm.put("Route", uid("r"), {"match": {"hosts": [host], "path": {"prefix": "/flaky/delay"}},
                                     "destinations": [{"service": svc}],
                                     "fault": {"delay": {"percent": 100, "duration": "300ms"}}})  # fmt: skip
    status, _, body = await request(f"{pm.a.url}/flaky/abort", headers={"Host": host})
    assert status == 418 and json.loads(body)["error"] == "fault_injected" and up.hits == 0
    t0 = time.monotonic()
    status, _, _ = await request(f"{pm.a.url}/flaky/delay", headers={"Host": host})
    assert status == 200 and time.monotonic() - t0 >= 0.3


async def test_mirror_receives_copies(pm: PolicyMesh) -> None:
    host = f"{uid('h')}.example.com"
    main, shadow = uid("s"), uid("s")
    primary = await pm.upstream(main, name="primary")
    copy = await pm.upstream(shadow, name="shadow")
    await pm.put("Route", uid("r"), {"match": {"hosts": [host]}, "destinations": [{"service": main}],
                                     "mirror": {"service": shadow, "percent": 100}})  # fmt: skip
    for i in range(5):
        status, _, body = await request(
            f"{pm.a.url}/echo/{i}", "POST", headers={"Host": host}, data=b"payload"
        )
        assert status == 200 and json.loads(body)["upstream"] == "primary"
    await wait_for(lambda: copy.hits == 5, 3)
    assert primary.hits == 5
    assert {s["path"] for s in copy.seen} == {f"/echo/{i}" for i in range(5)}
    assert all(s["headers"]["x-zonemesh-mirror"] == "1" and s["method"] == "POST" for s in copy.seen)


async def test_route_timeout_override(pm: PolicyMesh) -> None:
    host = f"{uid('h')}.example.com"
    svc = uid("s")
    await pm.upstream(svc)
    await pm.put("Route", uid("r"), {"match": {"hosts": [host]}, "destinations": [{"service": svc}], "timeout": "200ms",
                                     "retries": {"attempts": 0}})  # fmt: skip
    t0 = time.monotonic()
    status, _, body = await request(f"{pm.a.url}/slow/2", headers={"Host": host})
    assert status == 504 and json.loads(body)["error"] == "upstream_timeout"
    assert time.monotonic() - t0 < 1.5


BAD_VALUES = {
    "bad-json": '{"destinations": [',
    "bad-yaml": "destinations: [service: x\n  - :",
    "unknown-field": '{"destinations": [{"service": "SVC"}], "colour": "blue"}',
    "bad-regex": '{"match": {"path": {"regex": "(["}}, "destinations": [{"service": "SVC"}]}',
    "out-of-range": '{"priority": 5000, "destinations": [{"service": "SVC"}]}',
    "unknown-service": '{"destinations": [{"service": "no-such-service"}]}',
    "header-injection": '{"destinations": [{"service": "SVC"}], "response_headers": {"set": {"x-a": "1\\r\\nset-cookie: x"}}}',
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
async def test_bad_value_keeps_last_good_and_is_reported(pm: PolicyMesh, case: str) -> None:
    host = f"{uid('h')}.example.com"
    svc = uid("s")
    await pm.upstream(svc, name="good")
    name = uid("r")
    await pm.put(
        "Route", name, {"match": {"hosts": [host]}, "direct_response": {"status": 200, "body": "v1"}}
    )
    key = f"{pm.keys.policy}routes/{name}"
    pm.etcd.etcdctl("put", key, BAD_VALUES[case].replace("SVC", svc))

    async def cfg() -> dict:
        return await pm.a.config()

    data = await wait_until(cfg, 5, check=lambda d: key in d["policy"]["rejected"])
    reason = data["policy"]["rejected"][key]
    expected = {"bad-json": "JSON or YAML", "bad-yaml": "JSON or YAML", "unknown-field": "colour",
                "bad-regex": "invalid regex", "out-of-range": "priority", "unknown-service": "unknown service",
                "header-injection": "control characters"}  # fmt: skip
    assert expected[case] in reason, reason
    # Traffic still flows on the last good version of that key.
    status, _, body = await request(f"{pm.a.url}/", headers={"Host": host})
    assert status == 200 and body == b"v1"
    # The reject is in the gateway's status key and in its metrics.
    status_doc = await wait_until(
        lambda: _status_of(pm), 5, check=lambda s: key in s.get("a", {}).get("rejected", {})
    )
    assert status_doc["a"]["applied_revision"] > 0
    async with aiohttp.ClientSession() as s, s.get(f"{pm.a.admin}/metrics") as r:
        text = await r.text()
    assert "zonemesh_policy_rejected_keys " in text and "zonemesh_policy_rejects_total " in text
    # A valid value replaces it and clears the reject.
    await pm.put(
        "Route", name, {"match": {"hosts": [host]}, "direct_response": {"status": 200, "body": "v2"}}
    )
    assert (await request(f"{pm.a.url}/", headers={"Host": host}))[2] == b"v2"
    assert key not in (await pm.a.config())["policy"]["rejected"]


async def _status_of(pm: PolicyMesh) -> dict:
    return {s["zone"]: s for s in await pm.store.gateway_status()}


async def test_bad_service_policy_and_mesh_keep_last_good(pm: PolicyMesh) -> None:
    svc = uid("s")
    await pm.upstream(svc)
    await pm.put("Service", svc, {"circuit_breaker": {"max_requests": 1}})
    pm.etcd.etcdctl("put", f"{pm.keys.policy}services/{svc}", '{"circuit_breaker": {"max_requests": -5}}')
    await wait_until(
        pm.a.config, 5, check=lambda d: f"{pm.keys.policy}services/{svc}" in d["policy"]["rejected"]
    )
    results = await asyncio.gather(
        *(request(f"{pm.a.url}/slow/0.3", headers={"Host": f"{svc}.mesh"}) for _ in range(3))
    )
    assert sorted(r[0] for r in results) == [200, 503, 503]  # max_requests 1 still in force


async def test_change_is_in_force_quickly_on_every_gateway(pm: PolicyMesh) -> None:
    host = f"{uid('h')}.example.com"
    name = uid("r")
    took = []
    for n in range(5):
        _, revision = await pm.store.put("Route", name, {"match": {"hosts": [host]},
                                                         "direct_response": {"status": 200, "body": f"n{n}"}})  # fmt: skip
        took.append(await pm.applied(revision))
        assert (await request(f"{pm.b.url}/", headers={"Host": host}))[2] == f"n{n}".encode()
    assert min(took) < 1.0, took  # measured precisely by the benchmark; here: it is applied, promptly


class ControlPlane:
    def __init__(self, procs: Procs, settings: EtcdSettings, token: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = procs.zonemesh("control", "--listen", f"127.0.0.1:{self.port}",
                                   env={**settings.env(), "ZONEMESH_CONTROL_TOKEN": token})  # fmt: skip

    async def ready(self) -> ControlPlane:
        async def up() -> bool:
            try:
                return (await request(f"{self.url}/healthz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await wait_until(up, 15)
        return self


async def test_control_plane_api(pm: PolicyMesh, procs: Procs) -> None:
    cp = await ControlPlane(procs, pm.settings, "s3cret").ready()
    auth = {"Authorization": "Bearer s3cret"}
    svc = uid("s")
    await pm.upstream(svc)
    name = uid("r")
    url = f"{cp.url}/v1/routes/{name}"
    spec = {"match": {"hosts": ["api.example.com"]}, "destinations": [{"service": svc}]}
    status, _, body = await request(url, "PUT", json=spec)
    assert status == 401 and json.loads(body)["error"] == "unauthenticated"
    status, _, body = await request(
        url, "PUT", json={"destinations": [{"service": svc, "weight": -1}]}, headers=auth
    )
    err = json.loads(body)
    assert status == 400 and err["errors"][0]["field"] == "destinations.0.weight"
    status, headers, body = await request(url, "PUT", json=spec, headers={**auth, "If-None-Match": "*"})
    assert status == 200
    etag = headers["etag"]
    status, _, _ = await request(url, "PUT", json=spec, headers={**auth, "If-None-Match": "*"})
    assert status == 412
    # Two writers read the same ETag: the first wins, the second gets 412 with the current revision.
    first = await request(url, "PUT", json={**spec, "priority": 1}, headers={**auth, "If-Match": etag})
    second = await request(url, "PUT", json={**spec, "priority": 2}, headers={**auth, "If-Match": etag})
    assert first[0] == 200 and second[0] == 412
    assert json.loads(second[2])["current_revision"] == int(first[1]["etag"].strip('"'))
    status, headers, body = await request(url)
    assert status == 200 and json.loads(body)["spec"]["priority"] == 1 and headers["etag"] == first[1]["etag"]
    status, _, body = await request(f"{cp.url}/v1/routes")
    assert name in {i["name"] for i in json.loads(body)["items"]}
    status, _, body = await request(f"{cp.url}/v1/mesh", "PUT", data=b"defaults:\n  retries: {attempts: 3}\n",
                                    headers={**auth, "Content-Type": "application/yaml"})  # fmt: skip
    assert status == 200 and json.loads(body)["spec"] == {"defaults": {"retries": {"attempts": 3}}}
    status, _, body = await request(f"{cp.url}/v1/status")
    assert {g["zone"] for g in json.loads(body)["gateways"]} == {"a", "b"}
    status, _, body = await request(f"{cp.url}/openapi.json")
    schema = json.loads(body)
    assert "/v1/routes/{name}" in schema["paths"] and "Route" in schema["components"]["schemas"]
    assert (await request(url, "DELETE", headers={**auth, "If-Match": '"1"'}))[0] == 412
    assert (await request(url, "DELETE", headers=auth))[0] == 204
    assert (await request(url, "DELETE", headers=auth))[0] == 404
    assert (await request(f"{cp.url}/v1/routes/Bad_Name"))[0] == 400
    assert (await request(f"{cp.url}/v1/mesh", "DELETE", headers=auth))[0] == 204


async def test_cli_apply_get_delete(pm: PolicyMesh, procs: Procs, tmp_path) -> None:
    cp = await ControlPlane(procs, pm.settings, "tok").ready()
    svc = uid("s")
    await pm.upstream(svc)
    name = uid("r")
    host = f"{uid('h')}.example.com"
    f = tmp_path / "policy.yaml"
    f.write_text(f"""
kind: Service
name: {svc}
spec:
  retries: {{attempts: 2}}
---
kind: Route
name: {name}
spec:
  match: {{hosts: [{host}]}}
  destinations: [{{service: {svc}}}]
""")
    env = pm.settings.env()
    via_api = ("policy", "--server", cp.url, "--token", "tok")
    res = await asyncio.to_thread(run_cli, *via_api, "apply", "-f", str(f), "--dry-run", env=env)
    assert (
        res.returncode == 0
        and f"route/{name} created (dry run)" in res.stdout
        and "+destinations:" in res.stdout
    )
    assert await pm.store.get("Route", name) is None
    res = await asyncio.to_thread(run_cli, *via_api, "apply", "-f", str(tmp_path), env=env)
    assert res.returncode == 0, res.stderr
    assert f"route/{name} created" in res.stdout and f"service/{svc} created" in res.stdout
    res = await asyncio.to_thread(run_cli, "policy", "apply", "-f", str(f), env=env)  # straight to etcd
    assert f"route/{name} unchanged" in res.stdout
    assert (await request(f"{pm.a.url}/flaky", headers={"Host": host}))[0] == 200
    res = await asyncio.to_thread(run_cli, "policy", "get", "routes", name, "-o", "json", env=env)
    assert json.loads(res.stdout)["spec"]["destinations"] == [{"service": svc}]
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Route\nname: x\nspec:\n  destinations: [{service: s, weight: lots}]\n")
    res = await asyncio.to_thread(run_cli, "policy", "apply", "-f", str(bad), env=env)
    assert res.returncode == 2 and "destinations.0.weight" in res.stderr
    res = await asyncio.to_thread(run_cli, *via_api, "delete", "routes", name, env=env)
    assert res.returncode == 0 and await pm.store.get("Route", name) is None
    res = await asyncio.to_thread(run_cli, "policy", "--server", cp.url, "delete", "services", svc, env=env)
    assert res.returncode == 1 and "Bearer" in res.stderr


async def test_zone_failover_off_keeps_traffic_local(pm: PolicyMesh) -> None:
    svc = uid("s")
    await pm.upstream(svc, "b", name="only-b")
    assert (await request(f"{pm.a.url}/flaky", headers={"Host": f"{svc}.mesh"}))[0] == 200
    await pm.put("Service", svc, {"zone_failover": False})
    status, _, body = await request(f"{pm.a.url}/flaky", headers={"Host": f"{svc}.mesh"})
    assert status == 503 and "in this zone" in json.loads(body)["message"]


async def test_mesh_defaults_apply_under_service_policy(pm: PolicyMesh) -> None:
    svc = uid("s")
    bad = await pm.upstream(svc, name="bad")
    await pm.upstream(svc, name="good")
    bad.fail_status = 500
    try:
        await pm.put("Mesh", "mesh", {"defaults": {"retries": {"attempts": 3, "retry_on": ["5xx"]}}})
        await pm.put("Service", svc, {"balancer": "round_robin"})  # sets no retries: the mesh default applies
        for _ in range(10):
            assert (await request(f"{pm.a.url}/flaky", headers={"Host": f"{svc}.mesh"}))[0] == 200
    finally:
        _, revision = await pm.store.put("Mesh", "mesh", {})
        await pm.applied(revision)


async def test_outlier_detection_from_service_policy(pm: PolicyMesh) -> None:
    svc = uid("s")
    bad = await pm.upstream(svc, name="bad")
    bad.fail_status = 500
    await pm.put("Service", svc, {"outlier_detection": {"consecutive_failures": 2, "base_ejection": "5s"},
                                  "retries": {"attempts": 0}})  # fmt: skip
    assert [(await request(f"{pm.a.url}/flaky", headers={"Host": f"{svc}.mesh"}))[0] for _ in range(3)] == [
        500,
        500,
        503,
    ]


async def test_plain_etcdctl_yaml_route_is_applied(pm: PolicyMesh) -> None:
    host = f"{uid('h')}.example.com"
    name = uid("r")
    pm.etcd.etcdctl("put", f"{pm.keys.policy}routes/{name}",
                    f"match:\n  hosts: [{host}]\ndirect_response:\n  status: 203\n  body: from-etcdctl\n")  # fmt: skip
    await wait_until(pm.a.config, 5, check=lambda d: name in d["policy"]["routes"])
    status, _, body = await request(f"{pm.a.url}/", headers={"Host": host})
    assert status == 203 and body == b"from-etcdctl"
    pm.etcd.etcdctl("del", f"{pm.keys.policy}routes/{name}")
    await wait_until(pm.a.config, 5, check=lambda d: name not in d["policy"]["routes"])
    assert (await request(f"{pm.a.url}/", headers={"Host": host}))[0] == 404


async def test_upstream_response_hop_headers_are_cut_from_a_head_passed_on_as_it_arrived_or_reformatted(
    pm: PolicyMesh,
) -> None:
    """A head laid out as parsed goes on as its lines (hop-by-hop ones cut out); one with other spacing, or
    whose Connection names headers, is formatted again. The client sees the same either way."""
    name = uid("s")
    heads = {
        b"/clean": b"HTTP/1.1 200 OK\r\nServer: up\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\n"
        b"X-Kept: yes\r\nVia: 1.0 up\r\nProxy-Authenticate: Basic\r\nContent-Length: 2\r\n\r\nok",
        b"/spacing": b"HTTP/1.1 200 OK\r\nServer:up\r\nKeep-Alive: timeout=5\r\nX-Kept:   yes\r\n"
        b"Via: 1.0 up\r\nContent-Length: 2\r\n\r\nok",
        b"/named": b"HTTP/1.1 200 OK\r\nServer: up\r\nX-Hop: 1\r\nConnection: keep-alive, X-Hop\r\n"
        b"X-Kept: yes\r\nVia: 1.0 up\r\nContent-Length: 2\r\n\r\nok",
    }

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(heads[head.split(b" ", 2)[1]])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    inst = Instance(id=new_instance_id(name), service=name, zone="a", address="127.0.0.1",
                    port=server.sockets[0].getsockname()[1])  # fmt: skip
    try:
        async with HeartbeatClient(inst, pm.settings, ttl=5):
            await wait_until(lambda: pm.a.knows(name, 1), 5)
            for path in [
                *heads,
                *heads,
            ]:  # (the second time on a pooled connection: answered from a callback)
                raw = await raw_request(
                    pm.a.port,
                    b"GET %b HTTP/1.1\r\nHost: %b.mesh\r\nConnection: close\r\n\r\n" % (path, name.encode()),
                )
                head, _, body = raw.partition(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                assert lines[0] == b"http/1.1 200 ok" and body == b"ok", raw
                fields = [line.split(b":", 1)[0] for line in lines[1:]]
                assert sorted(fields) == sorted([b"server", b"x-kept", b"via", b"content-length", b"x-request-id",
                                                 b"x-zonemesh-zone", b"connection"]), (path, raw)  # fmt: skip
                assert b"via: 1.0 up, 1.1 zonemesh-a" in lines and b"connection: close" in lines
                assert any(line.startswith(b"x-kept:") and line.endswith(b"yes") for line in lines)
    finally:
        server.close()
