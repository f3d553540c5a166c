"""Runs a zone gateway: catalog, health checks, self-registration, the proxy and admin listeners."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator

import uvicorn

import gateway
from gateway.admin import make_admin_app, make_worker_stats_app
from gateway.cluster import ClusterSet, base_policy
from gateway.config import GatewayConfig
from gateway.downstream import GatewayHttpProtocol
from gateway.health import HealthChecker
from gateway.listen import bind
from gateway.metrics import Metrics
from gateway.policy_state import PolicyState
from gateway.proxy import ProxyApp
from gateway.upstream import PoolStats
from policy.compile import RoutingTable
from registry.catalog import Catalog, Snapshot
from registry.heartbeat import HeartbeatClient
from registry.keys import Keys
from registry.model import GatewayRecord

log = logging.getLogger("zonemesh.gateway")


class _Server(uvicorn.Server):
    """uvicorn server whose signals we handle ourselves (we run two servers in one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Gateway:
    """One gateway process. ``register`` is False in extra workers (one record per gateway, not per worker)."""

    def __init__(
        self,
        config: GatewayConfig,
        register: bool = True,
        serve_admin: bool = True,
        stats_socket: str | None = None,
        worker_sockets: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.stats_socket = stats_socket  # extra workers: where we export metrics for worker 0
        self.worker_sockets = worker_sockets  # worker 0: the other workers' stats sockets
        snap = config.snapshot_dir
        self.catalog = Catalog(config.etcd, f"{snap}/catalog.json" if snap else None, snapshot_write=register)
        self.stats = PoolStats()
        self.clusters = ClusterSet(config, self.stats)
        self.metrics = Metrics()
        self.app = ProxyApp(config, self.clusters, self.metrics)
        self.health = HealthChecker(self.clusters)
        self.policy = PolicyState(
            config.etcd, base_policy(config), lambda: set(self.catalog.snapshot.services),
            f"{snap}/policy.json" if snap else None, snapshot_write=register,
        )  # fmt: skip
        self.policy.subscribe(self._policy_changed)
        self.status_beat: HeartbeatClient | None = None
        self._service_names: frozenset[str] = frozenset()
        self.register = register
        self.serve_admin = serve_admin
        self.heartbeat: HeartbeatClient | None = None
        self.port = config.listen[1]
        self.admin_port = config.admin[1]
        self._install_metrics()

    def _install_metrics(self) -> None:
        m, s, c = self.metrics, self.stats, self.catalog
        m.counters.update(
            {
                "zonemesh_upstream_connects_total": lambda: s.connects,
                "zonemesh_upstream_reused_total": lambda: s.reused,
                "zonemesh_upstream_connect_failures_total": lambda: s.connect_failures,
                "zonemesh_outlier_ejections_total": lambda: self.clusters.ejections_total,
            }
        )
        m.gauges.update(
            {
                "zonemesh_catalog_revision": lambda: c.mirror.revision,
                "zonemesh_catalog_instances": lambda: c.snapshot.instance_count,
                "zonemesh_catalog_services": lambda: len(c.snapshot.services),
                "zonemesh_catalog_gateways": lambda: sum(len(g) for g in c.snapshot.gateways.values()),
                "zonemesh_catalog_stale": lambda: 1.0 if c.stale else 0.0,
                "zonemesh_catalog_rejected_keys": lambda: len(c.rejected),
                "zonemesh_policy_revision": lambda: self.policy.table.revision,
                "zonemesh_policy_routes": lambda: len(self.policy.table.routes),
                "zonemesh_policy_rejected_keys": lambda: len(self.policy.rejected),
                "zonemesh_policy_stale": lambda: 1.0 if self.policy.mirror.stale else 0.0,
            }
        )
        m.counters["zonemesh_policy_rejects_total"] = lambda: self.policy.rejects_total

    def _catalog_changed(self, snap: Snapshot) -> None:
        self.clusters.update(snap)
        names = frozenset(snap.services)
        if names != self._service_names:  # routes naming a service that (dis)appeared are re-validated
            self._service_names = names
            if self.policy.mirror.synced.is_set():
                self.policy.recompile()

    def _policy_changed(self, table: RoutingTable) -> None:
        self.clusters.apply_policy(table)
        if self.status_beat is not None:
            self.status_beat.update(self.policy.status(self.config.gateway_id, self.config.zone))

    async def run(
        self,
        stop: asyncio.Event,
        proxy_sock: socket.socket | None = None,
        admin_sock: socket.socket | None = None,
    ) -> None:
        cfg = self.config
        proxy_sock = proxy_sock or bind(*cfg.listen)
        self.port = proxy_sock.getsockname()[1]
        if self.serve_admin:
            admin_sock = admin_sock or bind(*cfg.admin)
            self.admin_port = admin_sock.getsockname()[1]
        self.catalog.subscribe(self._catalog_changed)
        await self.catalog.start()
        await self.policy.start()
        self.health.start()
        if self.register:
            record = GatewayRecord(
                id=cfg.gateway_id, zone=cfg.zone, address=cfg.advertised_address, port=self.port,
                admin_port=self.admin_port if self.serve_admin else None, version=_version(),
            )  # fmt: skip
            self.heartbeat = HeartbeatClient(record, cfg.etcd, ttl=cfg.lease_ttl)
            await self.heartbeat.register(wait=0.5)
            status_key = Keys(cfg.etcd.prefix).gateway_status(cfg.gateway_id)
            status = self.policy.status(cfg.gateway_id, cfg.zone)
            self.status_beat = HeartbeatClient(status, cfg.etcd, ttl=cfg.lease_ttl, key=status_key)
            await self.status_beat.register(wait=0.5)
        proxy = _Server(
            uvicorn.Config(
                self.app,
                http=GatewayHttpProtocol.configured(
                    self.app.handle, cfg.max_header_bytes, cfg.header_timeout
                ),
                ws="websockets-sansio",
                loop="none",
                lifespan="off",
                access_log=False,
                server_header=False,
                date_header=False,
                proxy_headers=False,
                timeout_keep_alive=cfg.keepalive_timeout,
                timeout_graceful_shutdown=cfg.drain_timeout,
                log_level="warning",
                ws_max_size=64 * 1024 * 1024,
            )
        )
        servers = [proxy]
        tasks = [asyncio.ensure_future(proxy.serve(sockets=[proxy_sock]))]
        if self.serve_admin:
            admin = _Server(
                uvicorn.Config(
                    make_admin_app(self), loop="none", lifespan="off", access_log=False, log_level="warning"
                )
            )
            servers.append(admin)
            tasks.append(asyncio.ensure_future(admin.serve(sockets=[admin_sock])))
        if self.stats_socket:
            stats = _Server(
                uvicorn.Config(
                    make_worker_stats_app(self), uds=self.stats_socket, loop="none", lifespan="off",
                    access_log=False, log_level="warning",
                )
            )  # fmt: skip
            servers.append(stats)
            tasks.append(asyncio.ensure_future(stats.serve()))
        evictor = asyncio.ensure_future(self._evict_idle())
        tune_gc()
        log.info("gateway %s zone %s listening on %s:%d (admin %s); request path: %s", cfg.gateway_id, cfg.zone,
                 cfg.listen[0], self.port, self.admin_port if self.serve_admin else "-", gateway.RUNNING)  # fmt: skip
        try:
            done, _ = await asyncio.wait(
                [asyncio.ensure_future(stop.wait()), *tasks], return_when="FIRST_COMPLETED"
            )
        finally:
            # Leave the mesh first so peers stop sending, then drain in-flight requests.
            for beat in (self.heartbeat, self.status_beat):
                if beat is not None:
                    await beat.deregister()
            for server in servers:
                server.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)
            evictor.cancel()
            await self.health.stop()
            await self.catalog.stop()
            await self.policy.stop()
            self.clusters.close()

    async def worker_metrics(self) -> list[dict]:
        """Metrics exported by the other workers of this gateway (a worker that does not answer is skipped)."""
        import aiohttp

        async def one(path: str) -> dict | None:
            try:
                async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as session:
                    async with session.get(
                        "http://worker/metrics.json", timeout=aiohttp.ClientTimeout(total=2)
                    ) as r:
                        return await r.json()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("worker stats at %s unavailable: %s", path, exc)
                return None

        results = await asyncio.gather(*(one(p) for p in self.worker_sockets))
        return [r for r in results if r is not None]

    async def _evict_idle(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.config.pool_idle_timeout / 4))
            self.clusters.evict_idle()


def tune_gc() -> None:
    """Move everything alive after start-up out of the collector's sight and collect young objects far less
    often. Python's default (a gen-0 pass every 700 allocations) costs this proxy ~30% of its throughput and
    adds tens of ms to p99; request objects are short-lived and acyclic, so little is lost by waiting."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("zonemesh")
    except Exception:  # noqa: BLE001
        return "dev"


def serve(config: GatewayConfig) -> None:
    """Run the gateway until SIGINT/SIGTERM, with ``config.workers`` processes sharing the listening socket."""
    import uvloop

    proxy_sock = bind(*config.listen)
    admin_sock = bind(*config.admin)
    if config.workers == 1:
        uvloop.run(_main(Gateway(config), proxy_sock, admin_sock))
        return
    import shutil
    import tempfile

    run_dir = tempfile.mkdtemp(prefix="zonemesh-gw-")
    sockets = tuple(os.path.join(run_dir, f"worker-{i}.sock") for i in range(1, config.workers))
    children: list[int] = []
    for index in range(1, config.workers):
        pid = os.fork()
        if pid == 0:
            admin_sock.close()
            code = 0
            try:
                worker = Gateway(config, register=False, serve_admin=False, stats_socket=sockets[index - 1])
                uvloop.run(_main(worker, proxy_sock, None))
            except BaseException:  # noqa: BLE001
                log.exception("worker %d failed", index)
                code = 1
            os._exit(code)
        children.append(pid)
    try:
        uvloop.run(_main(Gateway(config, worker_sockets=sockets), proxy_sock, admin_sock))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        shutil.rmtree(run_dir, ignore_errors=True)


async def _main(gw: Gateway, proxy_sock: socket.socket, admin_sock: socket.socket | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await gw.run(stop, proxy_sock, admin_sock)


def configure_logging(level: str, access_log: bool) -> None:
    """Logs to stderr; the access log (one JSON object per line) to stdout."""
    access = logging.getLogger("zonemesh.access")
    access.propagate = False
    access.setLevel(logging.INFO if access_log else logging.WARNING)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
