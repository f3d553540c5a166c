"""Self-registration: put an instance under an etcd lease and keep the lease alive.

``HeartbeatClient`` is async; ``SyncHeartbeatClient`` runs one on a private event loop in a daemon thread
for WSGI and threaded apps. Neither ever raises etcd trouble into the application: it logs, retries with
backoff, and re-registers under a new lease when the old one expired.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from registry.aio import cancel_and_wait
from registry.etcd import ETCD_ERRORS, Backoff, EtcdClient, EtcdSettings, close_quietly
from registry.keys import Keys
from registry.model import GatewayRecord, Instance

log = logging.getLogger("zonemesh.heartbeat")

DEFAULT_TTL = 10


class HeartbeatClient:
    """Registers ``record`` (an Instance or GatewayRecord, or anything with ``to_json()`` under an explicit
    ``key``) under a lease of ``ttl`` seconds while running."""

    def __init__(
        self,
        record: Instance | GatewayRecord | Any,
        settings: EtcdSettings | None = None,
        ttl: int = DEFAULT_TTL,
        key: str | None = None,
    ) -> None:
        if not 1 <= ttl <= 3600:
            raise ValueError(f"ttl {ttl!r}: must be between 1 and 3600 seconds")
        self.settings = settings or EtcdSettings.from_env()
        self.record = record
        self.ttl = ttl
        keys = Keys(self.settings.prefix)
        if key is not None:
            self.key = key
        elif isinstance(record, Instance):
            self.key = keys.instance(record.service, record.zone, record.id)
        else:
            self.key = keys.gateway(record.zone, record.id)
        self.lease_id: int | None = None
        self.registrations = 0
        self.last_error: str | None = None
        self._registered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: EtcdClient | None = None
        self._dirty = False
        self._wake = asyncio.Event()

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    async def register(self, wait: float = 5.0) -> bool:
        """Start heartbeating; wait up to ``wait`` s for the first registration. True when registered.

        Never raises for etcd trouble: when etcd is unreachable it keeps retrying in the background.
        """
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"heartbeat-{self.key}")
        try:
            await asyncio.wait_for(self._registered.wait(), wait)
        except TimeoutError:
            log.warning(
                "heartbeat %s: not registered yet (%s); retrying in the background", self.key, self.last_error
            )
        return self.registered

    def update(self, record: Instance | GatewayRecord | Any) -> None:
        """Replace the stored value (same key); written at once when registered."""
        self.record = record
        self._dirty = True
        self._wake.set()

    async def deregister(self) -> None:
        """Stop heartbeating, delete the key and revoke the lease so gateways drain the instance at once."""
        await cancel_and_wait(self._task)
        self._task = None
        client, self._client = self._client, None
        if self.lease_id is not None:
            client = client or self.settings.client()
            try:
                await asyncio.wait_for(client.delete(self.key.encode()), self.settings.timeout)
                await asyncio.wait_for(client.revoke_lease(self.lease_id), self.settings.timeout)
                log.info("heartbeat %s: deregistered", self.key)
            except ETCD_ERRORS as exc:
                log.warning("heartbeat %s: deregistration failed (%s); the lease will expire", self.key, exc)
        self.lease_id = None
        self._registered.clear()
        await close_quietly(client)

    async def __aenter__(self) -> HeartbeatClient:
        await self.register()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.deregister()

    async def _run(self) -> None:
        backoff = Backoff(0.2, max(0.5, self.ttl / 3))
        attempt = 0
        last_ok = time.monotonic()
        next_refresh = 0.0
        while True:
            if self._client is None:
                self._client = self.settings.client(attempt)
            try:
                if self.lease_id is None:
                    await self._grant_and_put(self._client)
                    next_refresh = time.monotonic() + self.ttl / 3
                if self._dirty:
                    self._dirty = False
                    await self._client.put(self.key.encode(), self.record.to_json(), lease=self.lease_id)
                # Keep-alives are due every TTL/3 however often the value changes: a put does not renew a lease.
                if time.monotonic() >= next_refresh:
                    reply = await asyncio.wait_for(
                        self._client.refresh_lease(self.lease_id), self.settings.timeout
                    )
                    if reply is None or reply.TTL <= 0:
                        log.warning("heartbeat %s: lease %x expired; re-registering", self.key, self.lease_id)
                        self._lost_lease()
                        continue
                    next_refresh = time.monotonic() + self.ttl / 3
                last_ok = time.monotonic()
                self.last_error = None
                backoff.reset()
                if not self._dirty:
                    try:
                        await asyncio.wait_for(self._wake.wait(), max(0.0, next_refresh - time.monotonic()))
                    except TimeoutError:
                        pass
                self._wake.clear()
            except asyncio.CancelledError:
                raise
            except ETCD_ERRORS as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("heartbeat %s: etcd error: %s", self.key, self.last_error)
                if time.monotonic() - last_ok > self.ttl:
                    self._lost_lease()
                await close_quietly(self._client)
                self._client = None
                attempt += 1
                await asyncio.sleep(backoff.next())

    def _lost_lease(self) -> None:
        self.lease_id = None
        self._registered.clear()

    async def _grant_and_put(self, client: EtcdClient) -> None:
        lease = await asyncio.wait_for(client.lease(self.ttl), self.settings.timeout)
        try:
            await asyncio.wait_for(
                client.put(self.key.encode(), self.record.to_json(), lease=lease.id), self.settings.timeout
            )
        except BaseException:
            try:
                await asyncio.wait_for(client.revoke_lease(lease.id), 1)
            except Exception:  # noqa: BLE001 - best effort; the lease expires anyway
                pass
            raise
        self.lease_id = lease.id
        self._dirty = False
        self.registrations += 1
        self._registered.set()
        log.info("heartbeat %s: registered (lease %x, ttl %ds)", self.key, lease.id, self.ttl)


class SyncHeartbeatClient:
    """Thread-backed wrapper of HeartbeatClient for WSGI / threaded apps (context manager or start/stop)."""

    def __init__(
        self, record: Instance | GatewayRecord, settings: EtcdSettings | None = None, ttl: int = DEFAULT_TTL
    ) -> None:
        self._args = (record, settings, ttl)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: HeartbeatClient | None = None

    @property
    def registered(self) -> bool:
        return bool(self._client and self._client.registered)

    @property
    def key(self) -> str | None:
        return self._client.key if self._client else None

    def start(self, wait: float = 5.0) -> bool:
        """Start the background thread and register; True once registered within ``wait`` seconds."""
        if self._thread is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._loop.run_forever, name="zonemesh-heartbeat", daemon=True
            )
            self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._register(wait), self._loop).result()  # type: ignore[arg-type]

    async def _register(self, wait: float) -> bool:
        if self._client is None:
            self._client = HeartbeatClient(*self._args)
        return await self._client.register(wait)

    def stop(self, timeout: float = 10.0) -> None:
        """Deregister and stop the thread."""
        if self._loop is None or self._thread is None:
            return
        if self._client is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._client.deregister(), self._loop).result(timeout)
            except Exception as exc:  # noqa: BLE001 - shutdown path: report, never raise
                log.warning("heartbeat: deregistration did not finish: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop.close()
        self._loop = self._thread = self._client = None

    def __enter__(self) -> SyncHeartbeatClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
