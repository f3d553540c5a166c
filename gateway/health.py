"""Active health checking: GET each instance's health path on its service's interval (thresholds applied
in ClusterSet.record_check)."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from gateway.cluster import ClusterSet, Endpoint

log = logging.getLogger("zonemesh.gateway.health")
TICK = 0.1


class HealthChecker:
    """Checks every instance that declares a ``health_path`` (2xx/3xx = pass), many at a time."""

    def __init__(self, clusters: ClusterSet, concurrency: int = 64) -> None:
        self.clusters = clusters
        self._sem = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.checks = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="health-checker")

    async def stop(self) -> None:
        for task in [self._task, *self._running]:
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *[t for t in [self._task, *self._running] if t is not None], return_exceptions=True
        )

    async def _run(self) -> None:
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            while True:
                try:
                    self._schedule(session)
                except Exception:  # noqa: BLE001 - a bug here must not silently end health checking
                    log.exception("health checker: scheduling failed; retrying")
                await asyncio.sleep(TICK)

    def _schedule(self, session: aiohttp.ClientSession) -> None:
        """Start a check for every instance whose interval has passed."""
        now = time.monotonic()
        table = self.clusters.table
        for ep in self.clusters.checked:
            if now < ep.next_check:
                continue
            hc = table.service_policy(ep.service or "").health_check
            ep.next_check = now + hc.interval
            task = asyncio.ensure_future(self._check(session, ep, hc.timeout))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _check(self, session: aiohttp.ClientSession, ep: Endpoint, timeout: float) -> None:
        url = f"http://{ep.address}{ep.record.health_path}"  # type: ignore[union-attr]
        async with self._sem:
            try:
                async with session.get(
                    url, allow_redirects=False, headers={"user-agent": "zonemesh-health"},
                    timeout=aiohttp.ClientTimeout(total=timeout),
                ) as r:  # fmt: skip
                    await r.read()
                    ok, reason = r.status < 400, f"HTTP {r.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                ok, reason = False, type(exc).__name__
        self.checks += 1
        if not ep.removed:
            self.clusters.record_check(ep, ok, reason)
