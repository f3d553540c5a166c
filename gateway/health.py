"""Active health checking: GET each instance's health path on an interval, thresholds in ClusterSet."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from gateway.cluster import ClusterSet, Endpoint
from registry.model import Instance

log = logging.getLogger("zonemesh.gateway.health")


class HealthChecker:
    """Checks every instance that declares a ``health_path`` (2xx/3xx = pass), many at a time."""

    def __init__(self, clusters: ClusterSet, interval: float, timeout: float, concurrency: int = 64) -> None:
        self.clusters = clusters
        self.interval = interval
        self.timeout = timeout
        self._sem = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="health-checker")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(
            timeout=timeout, connector=connector, auto_decompress=False
        ) as session:
            while True:
                targets = [
                    ep
                    for ep in self.clusters.endpoints()
                    if isinstance(ep.record, Instance) and ep.record.health_path
                ]
                await asyncio.gather(*(self._check(session, ep) for ep in targets))
                self.rounds += 1
                await asyncio.sleep(self.interval)

    async def _check(self, session: aiohttp.ClientSession, ep: Endpoint) -> None:
        url = f"http://{ep.address}{ep.record.health_path}"  # type: ignore[union-attr]
        async with self._sem:
            try:
                async with session.get(
                    url, allow_redirects=False, headers={"user-agent": "zonemesh-health"}
                ) as r:
                    await r.read()
                    ok, reason = r.status < 400, f"HTTP {r.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                ok, reason = False, type(exc).__name__
        if not ep.removed:
            self.clusters.record_check(ep, ok, reason)
