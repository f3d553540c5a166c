"""The registry against a real etcd: heartbeat client, catalog, re-sync, agent, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aetcd
import pytest
from aiohttp import web

from registry.catalog import Catalog
from registry.embedded_etcd import EmbeddedEtcd, free_port
from registry.etcd import EtcdSettings
from registry.heartbeat import HeartbeatClient, SyncHeartbeatClient
from registry.keys import Keys
from registry.model import Instance, new_instance_id
from tests.conftest import Procs, TcpProxy, run_cli, wait_for


def make_instance(service: str = "orders", zone: str = "a", port: int = 8080, **kw: object) -> Instance:
    return Instance(
        id=new_instance_id(service), service=service, zone=zone, address="127.0.0.1", port=port, **kw
    )


def ids(catalog: Catalog, service: str) -> set[str]:
    return {i.id for i in catalog.snapshot.instances(service)}


async def test_register_visible_then_graceful_deregistration_is_immediate(settings: EtcdSettings) -> None:
    async with Catalog(settings) as catalog:
        inst = make_instance(tags={"tier": "gold"})
        hb = HeartbeatClient(inst, settings, ttl=5)
        assert await hb.register()
        await wait_for(lambda: inst.id in ids(catalog, "orders"), 2)
        seen = catalog.snapshot.instances("orders", "a")[0]
        assert seen == inst and seen.tags == {"tier": "gold"}
        assert hb.key == Keys(settings.prefix).instance("orders", "a", inst.id)
        await hb.deregister()
        took = await wait_for(lambda: not catalog.snapshot.instances("orders"), 1.0)
        assert took < 1.0


async def test_ids_are_unique_per_process_start() -> None:
    assert len({new_instance_id("svc") for _ in range(100)}) == 100


async def test_killed_process_leaves_within_ttl(settings: EtcdSettings, procs: Procs) -> None:
    env = settings.env()
    async with Catalog(settings) as catalog:
        proc = procs.zonemesh("demo-service", "--service", "pay", "--zone", "b", "--ttl", "2", env=env)
        await wait_for(lambda: catalog.snapshot.instances("pay", "b"), 15)
        os.kill(proc.pid, signal.SIGKILL)
        took = await wait_for(lambda: not catalog.snapshot.instances("pay"), 4)
        assert took <= 2 + 1, f"gone after {took:.2f}s"


async def test_sigterm_deregisters_at_once(settings: EtcdSettings, procs: Procs) -> None:
    async with Catalog(settings) as catalog:
        proc = procs.zonemesh(
            "demo-service", "--service", "pay", "--zone", "a", "--ttl", "10", env=settings.env()
        )
        await wait_for(lambda: catalog.snapshot.instances("pay", "a"), 15)
        proc.send_signal(signal.SIGTERM)
        took = await wait_for(lambda: not catalog.snapshot.instances("pay"), 1.5)
        assert took < 1.0, f"gone after {took:.2f}s"
        assert proc.wait(5) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown


async def test_expired_lease_is_replaced_by_a_new_registration(
    settings: EtcdSettings, etcd: EmbeddedEtcd
) -> None:
    async with Catalog(settings) as catalog:
        async with HeartbeatClient(make_instance(), settings, ttl=3) as hb:
            first_lease = hb.lease_id
            etcd.etcdctl("lease", "revoke", f"{first_lease:x}")
            await wait_for(lambda: not catalog.snapshot.instances("orders"), 2)
            await wait_for(lambda: hb.registered and hb.lease_id != first_lease, 5)
            await wait_for(lambda: catalog.snapshot.instances("orders"), 2)
            assert hb.registrations == 2


async def test_etcd_restart_client_and_catalog_recover(tmp_path) -> None:
    server = EmbeddedEtcd(tmp_path / "etcd")
    server.start()
    try:
        settings = EtcdSettings(endpoints=(server.endpoint,), prefix="/zonemesh")
        async with Catalog(settings) as catalog:
            clients = [
                HeartbeatClient(make_instance("svc", port=9000 + n), settings, ttl=2) for n in range(3)
            ]
            for c in clients:
                assert await c.register()
            await wait_for(lambda: len(catalog.snapshot.instances("svc")) == 3, 3)
            before = catalog.snapshot
            server.stop(kill=True)
            await wait_for(lambda: catalog.stale, 5)
            await asyncio.sleep(3)  # longer than the TTL: the gateway keeps serving the last snapshot
            assert catalog.snapshot.instances("svc") == before.instances("svc")
            server.start()
            await wait_for(lambda: not catalog.stale, 10)
            late = HeartbeatClient(make_instance("svc", port=9100), settings, ttl=2)
            assert await late.register()
            # Every instance is back (re-registered if its lease did not survive) and nothing is missing.
            await wait_for(lambda: all(c.registered for c in clients), 10)
            await wait_for(lambda: len(catalog.snapshot.instances("svc")) == 4, 10)
            await asyncio.sleep(2.5)  # past a TTL: leases are really being kept alive again
            assert len(catalog.snapshot.instances("svc")) == 4
            for c in [*clients, late]:
                await c.deregister()
            await wait_for(lambda: not catalog.snapshot.instances("svc"), 2)
    finally:
        server.cleanup()


async def test_compacted_history_triggers_full_resync(settings: EtcdSettings, etcd: EmbeddedEtcd) -> None:
    host, port = etcd.endpoint.split(":")
    proxy = TcpProxy(host, int(port))
    await proxy.up()
    via_proxy = EtcdSettings(endpoints=(f"127.0.0.1:{proxy.port}",), prefix=settings.prefix)
    keys = Keys(settings.prefix)
    a, b, c = make_instance(port=1), make_instance(port=2), make_instance(port=3)
    direct = settings.client()
    try:
        await direct.put(keys.instance("orders", "a", a.id).encode(), a.to_json())
        await direct.put(keys.instance("orders", "a", b.id).encode(), b.to_json())
        catalog = Catalog(via_proxy)
        await catalog.start(wait=5)
        assert ids(catalog, "orders") == {a.id, b.id}
        await proxy.down()
        await wait_for(lambda: catalog.stale, 5)
        # While the catalog is cut off: one instance leaves, one arrives, and history is compacted away.
        await direct.delete(keys.instance("orders", "a", a.id).encode())
        put = await direct.put(keys.instance("orders", "a", c.id).encode(), c.to_json())
        await direct.compact(put.header.revision)
        full_syncs = catalog.mirror.full_syncs
        await proxy.up()
        await wait_for(lambda: not catalog.stale, 10)
        assert catalog.mirror.compactions == 1
        assert catalog.mirror.full_syncs == full_syncs + 1
        assert ids(catalog, "orders") == {b.id, c.id}
        await catalog.stop()
    finally:
        await proxy.down()
        await direct.close()


async def test_broken_stream_resumes_without_losing_events(
    settings: EtcdSettings, etcd: EmbeddedEtcd
) -> None:
    host, port = etcd.endpoint.split(":")
    proxy = TcpProxy(host, int(port))
    await proxy.up()
    keys = Keys(settings.prefix)
    direct = settings.client()
    try:
        catalog = Catalog(EtcdSettings(endpoints=(f"127.0.0.1:{proxy.port}",), prefix=settings.prefix))
        await catalog.start(wait=5)
        await proxy.down()
        await wait_for(lambda: catalog.stale, 5)
        new = [make_instance(port=p) for p in (11, 12)]
        for inst in new:
            await direct.put(keys.instance("orders", "a", inst.id).encode(), inst.to_json())
        await proxy.up()
        await wait_for(lambda: ids(catalog, "orders") == {i.id for i in new}, 10)
        assert catalog.mirror.full_syncs == 1, "a resumable watch must not cost a full snapshot"
        await catalog.stop()
    finally:
        await proxy.down()
        await direct.close()


async def test_invalid_values_are_skipped_with_reasons(settings: EtcdSettings, etcd: EmbeddedEtcd) -> None:
    keys = Keys(settings.prefix)
    good = make_instance()
    async with Catalog(settings) as catalog, HeartbeatClient(good, settings, ttl=5):
        await wait_for(lambda: ids(catalog, "orders") == {good.id}, 2)
        wrong_schema = json.dumps({**json.loads(make_instance().to_json()), "schema": 9})
        mismatched = make_instance("other")
        bad = {
            keys.instance("orders", "a", "not-json"): "{nope",
            keys.instance("orders", "a", "schema9"): wrong_schema,
            keys.instance("orders", "a", "mismatch"): mismatched.to_json().decode(),
            keys.instance("orders", "a", "badport"): json.dumps(
                {**json.loads(make_instance().to_json()), "id": "badport", "port": 70000}
            ),
            keys.services + "Bad_Name/a/x": good.to_json().decode(),
            keys.services + "too/short": good.to_json().decode(),
        }
        for key, value in bad.items():
            etcd.etcdctl("put", key, value)
        await wait_for(lambda: len(catalog.rejected) == len(bad), 3)
        reasons = catalog.rejected
        assert "invalid JSON" in reasons[keys.instance("orders", "a", "not-json")]
        assert "schema" in reasons[keys.instance("orders", "a", "schema9")]
        assert "key says" in reasons[keys.instance("orders", "a", "mismatch")]
        assert "port" in reasons[keys.instance("orders", "a", "badport")]
        assert "DNS label" in reasons[keys.services + "Bad_Name/a/x"]
        assert ids(catalog, "orders") == {good.id}
        # A later valid instance still arrives; fixing a bad key clears its reject.
        fixed = make_instance()
        etcd.etcdctl("put", keys.instance("orders", "a", fixed.id), fixed.to_json().decode())
        etcd.etcdctl("del", keys.instance("orders", "a", "not-json"))
        await wait_for(lambda: ids(catalog, "orders") == {good.id, fixed.id}, 2)
        assert keys.instance("orders", "a", "not-json") not in catalog.rejected
        etcd.etcdctl("del", "--prefix", settings.prefix)


async def test_bad_value_over_a_good_one_keeps_the_last_good(
    settings: EtcdSettings, etcd: EmbeddedEtcd
) -> None:
    keys = Keys(settings.prefix)
    inst = make_instance()
    key = keys.instance("orders", "a", inst.id)
    etcd.etcdctl("put", key, inst.to_json().decode())
    async with Catalog(settings) as catalog:
        assert ids(catalog, "orders") == {inst.id}
        etcd.etcdctl("put", key, "garbage")
        await wait_for(lambda: key in catalog.rejected, 2)
        assert ids(catalog, "orders") == {inst.id}
    etcd.etcdctl("del", key)


async def test_unreachable_etcd_never_raises_into_the_app(settings: EtcdSettings) -> None:
    dead = EtcdSettings(endpoints=(f"127.0.0.1:{free_port()}",), prefix=settings.prefix, timeout=0.5)
    hb = HeartbeatClient(make_instance(), dead, ttl=3)
    assert await hb.register(wait=0.5) is False
    assert hb.last_error
    await hb.deregister()


async def test_second_endpoint_is_used_when_the_first_is_down(
    settings: EtcdSettings, etcd: EmbeddedEtcd
) -> None:
    both = EtcdSettings(
        endpoints=(f"127.0.0.1:{free_port()}", etcd.endpoint), prefix=settings.prefix, timeout=0.5
    )
    async with Catalog(both) as catalog, HeartbeatClient(make_instance(), both, ttl=3) as hb:
        assert hb.registered
        await wait_for(lambda: catalog.snapshot.instances("orders"), 5)


async def test_sync_heartbeat_client_in_a_thread(settings: EtcdSettings) -> None:
    async with Catalog(settings) as catalog:
        inst = make_instance("wsgi")
        client = SyncHeartbeatClient(inst, settings, ttl=3)
        assert await asyncio.to_thread(client.start)
        await wait_for(lambda: ids(catalog, "wsgi") == {inst.id}, 2)
        await asyncio.to_thread(client.stop)
        await wait_for(lambda: not catalog.snapshot.instances("wsgi"), 1)


class HealthServer:
    """A real HTTP server whose /health answer the test flips."""

    def __init__(self) -> None:
        self.ok = True
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def health(_: web.Request) -> web.Response:
            return web.Response(status=200 if self.ok else 503, text="ok" if self.ok else "down")

        app = web.Application()
        app.router.add_get("/health", health)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


async def test_agent_follows_health_and_deregisters_on_sigterm(settings: EtcdSettings, procs: Procs) -> None:
    health = HealthServer()
    await health.start()
    try:
        async with Catalog(settings) as catalog:
            proc = procs.zonemesh(
                "register", "--service", "legacy", "--zone", "a", "--address", "127.0.0.1",
                "--port", str(health.port), "--health-url", f"http://127.0.0.1:{health.port}/health",
                "--interval", "0.2", "--rise", "2", "--fall", "2", "--ttl", "5", "--tag", "lang=go",
                env=settings.env(),
            )  # fmt: skip
            await wait_for(lambda: catalog.snapshot.instances("legacy", "a"), 10)
            inst = catalog.snapshot.instances("legacy", "a")[0]
            assert inst.tags == {"lang": "go"} and inst.health_path == "/health"
            health.ok = False
            await wait_for(lambda: not catalog.snapshot.instances("legacy"), 3)
            health.ok = True
            await wait_for(lambda: catalog.snapshot.instances("legacy"), 3)
            proc.send_signal(signal.SIGTERM)
            await wait_for(lambda: not catalog.snapshot.instances("legacy"), 1.5)
            assert proc.wait(5) == 0
    finally:
        await health.stop()


async def test_agent_never_registers_an_unhealthy_app(settings: EtcdSettings, procs: Procs) -> None:
    port = free_port()  # nothing listens here
    async with Catalog(settings) as catalog:
        procs.zonemesh(
            "register", "--service", "ghost", "--zone", "a", "--address", "127.0.0.1", "--port", str(port),
            "--health-url", f"http://127.0.0.1:{port}/", "--interval", "0.2", env=settings.env(),
        )  # fmt: skip
        await asyncio.sleep(1.5)
        assert not catalog.snapshot.instances("ghost")


async def test_status_cli_table_and_json(settings: EtcdSettings) -> None:
    inst = make_instance("shop", "b", version="v7")
    async with HeartbeatClient(inst, settings, ttl=30):
        table = await asyncio.to_thread(run_cli, "status", env=settings.env())
        assert table.returncode == 0, table.stderr
        header, row = table.stdout.splitlines()[:2]
        assert header.split()[:3] == ["SERVICE", "ZONE", "INSTANCE"]
        assert row.split()[:4] == ["shop", "b", inst.id, "127.0.0.1:8080"]
        out = await asyncio.to_thread(
            run_cli, "status", "-o", "json", "--etcd", settings.endpoints[0], "--prefix", settings.prefix
        )
        data = json.loads(out.stdout)
        (row_json,) = data["services"]["shop"]["b"]
        assert row_json["id"] == inst.id and row_json["version"] == "v7"
        assert 25 <= row_json["ttl_left_s"] <= 30


def test_status_cli_names_unreachable_etcd() -> None:
    port = free_port()
    res = run_cli("status", "--etcd", f"127.0.0.1:{port}")
    assert res.returncode == 1
    assert f"127.0.0.1:{port}" in res.stderr and "unreachable" in res.stderr


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--port", "abc"], "--port"),
        (["--port", "70000"], "--port"),
        (["--service", "Bad_Name"], "--service"),
        (["--zone", ""], "--zone"),
        (["--tag", "novalue"], "--tag"),
        (["--health-url", "ftp://x/"], "--health-url"),
        (["--address", "not an address!"], "--address"),
        (["--etcd", "no-port"], "--etcd"),
        (["--ttl", "0"], "--ttl"),
        (["--etcd-ca", "/does/not/exist.pem"], "--etcd-ca"),
    ],
)
def test_register_bad_flags_give_one_line_naming_the_flag(args: list[str], flag: str) -> None:
    base = {"--service": "svc", "--zone": "a", "--address": "127.0.0.1", "--port": "80"}
    for name, value in zip(args[::2], args[1::2], strict=True):
        base[name] = value
    res = run_cli(
        "register", *[x for kv in base.items() for x in kv], "--etcd", base.get("--etcd", "127.0.0.1:1")
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert flag in lines[0] and "error" in lines[0]


def test_missing_required_flag_is_named() -> None:
    res = run_cli("register", "--service", "svc", "--zone", "a", "--address", "127.0.0.1")
    assert res.returncode == 2 and "--port" in res.stderr and len(res.stderr.strip().splitlines()) == 1


async def test_catalog_ready_and_snapshot_are_consistent(settings: EtcdSettings) -> None:
    client = settings.client()
    keys = Keys(settings.prefix)
    try:
        many = [make_instance(f"s{n % 7}", "ab"[n % 2], port=1000 + n) for n in range(60)]
        for inst in many:
            await client.put(keys.instance(inst.service, inst.zone, inst.id).encode(), inst.to_json())
        async with Catalog(settings) as catalog:
            assert catalog.ready and catalog.snapshot.instance_count == 60
            t0 = time.monotonic()
            await client.delete_prefix(keys.services.encode())
            await wait_for(lambda: catalog.snapshot.instance_count == 0, 2)
            assert time.monotonic() - t0 < 2
    finally:
        await client.close()


def test_aetcd_errors_are_our_etcd_errors() -> None:
    from registry.etcd import ETCD_ERRORS

    assert issubclass(aetcd.ConnectionFailedError, ETCD_ERRORS)
