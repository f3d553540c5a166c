"""Registration agent: registers an unmodified app (any language) while its health URL passes."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from registry.etcd import EtcdSettings
from registry.heartbeat import HeartbeatClient
from registry.model import Instance

log = logging.getLogger("zonemesh.agent")


class RegistrationAgent:
    """Holds ``instance`` registered only while ``health_url`` answers 2xx/3xx.

    ``fall`` consecutive failures deregister it; ``rise`` consecutive passes register it again (the first
    registration needs one pass). Without a health URL the instance is registered for as long as it runs.
    """

    def __init__(
        self,
        instance: Instance,
        settings: EtcdSettings,
        ttl: int = 10,
        health_url: str | None = None,
        interval: float = 2.0,
        timeout: float = 1.0,
        rise: int = 2,
        fall: int = 3,
    ) -> None:
        if interval <= 0 or timeout <= 0 or rise < 1 or fall < 1:
            raise ValueError("interval and timeout must be > 0, rise and fall >= 1")
        self.instance = instance
        self.settings = settings
        self.ttl = ttl
        self.health_url = health_url
        self.interval = interval
        self.timeout = timeout
        self.rise = rise
        self.fall = fall
        self.heartbeat: HeartbeatClient | None = None
        self.healthy = False
        self._passes = 0
        self._fails = 0
        self._ever_registered = False

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then deregister."""
        try:
            if self.health_url is None:
                await self._up()
                await stop.wait()
                return
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                while not stop.is_set():
                    await self._observe(await self._check(session))
                    try:
                        await asyncio.wait_for(stop.wait(), self.interval)
                    except TimeoutError:
                        pass
        finally:
            await self._down("agent stopping")

    async def _check(self, session: aiohttp.ClientSession) -> str | None:
        """None when healthy, else the reason."""
        try:
            async with session.get(self.health_url, allow_redirects=False) as resp:  # type: ignore[arg-type]
                await resp.read()
                return None if resp.status < 400 else f"HTTP {resp.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}".rstrip(": ")

    async def _observe(self, failure: str | None) -> None:
        if failure is None:
            self._passes, self._fails = self._passes + 1, 0
            needed = self.rise if self._ever_registered else 1
            if self.heartbeat is None and self._passes >= needed:
                await self._up()
        else:
            self._fails, self._passes = self._fails + 1, 0
            log.info("agent %s: health check failed (%s)", self.instance.id, failure)
            if self.heartbeat is not None and self._fails >= self.fall:
                await self._down(f"{self._fails} consecutive health check failures, last: {failure}")

    async def _up(self) -> None:
        self.healthy = True
        self._ever_registered = True
        self.heartbeat = HeartbeatClient(self.instance, self.settings, ttl=self.ttl)
        await self.heartbeat.register(wait=self.settings.timeout)
        log.info("agent %s: healthy, registered as %s", self.instance.id, self.heartbeat.key)

    async def _down(self, reason: str) -> None:
        self.healthy = False
        if self.heartbeat is not None:
            hb, self.heartbeat = self.heartbeat, None
            await hb.deregister()
            log.warning("agent %s: deregistered: %s", self.instance.id, reason)
