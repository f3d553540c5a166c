"""A live mirror of etcd prefixes: one consistent snapshot (get at revision R), then a watch from R+1.

A broken stream is resumed from the last revision seen (with backoff, rotating through the endpoints);
when that history was compacted away it takes a full new snapshot. While etcd is unreachable the consumer keeps what it has and
``stale`` is True. Used by the catalog (instances, gateways) and the policy store alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import aetcd

from registry.etcd import ETCD_ERRORS, Backoff, EtcdClient, EtcdSettings, close_quietly

log = logging.getLogger("zonemesh.mirror")

# apply(changes, full, revision): ``full`` means ``changes`` is the complete content of the prefixes.
ApplyFn = Callable[[dict[str, bytes | None], bool, int], None]


class PrefixMirror:
    """Keeps ``apply`` fed with every change under ``prefixes``."""

    def __init__(self, settings: EtcdSettings, prefixes: Sequence[str], apply: ApplyFn, name: str) -> None:
        self.settings = settings
        self.prefixes = list(prefixes)
        self.name = name
        self._apply = apply
        self.revision = 0
        self.synced = asyncio.Event()
        self.stale = True
        self.last_error: str | None = None
        self.last_sync: float | None = None
        self.full_syncs = 0
        self.compactions = 0
        self._task: asyncio.Task[None] | None = None
        self._client: EtcdClient | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"mirror-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await close_quietly(self._client)
        self._client = None

    async def _run(self) -> None:
        backoff = Backoff(0.1, 2.0)
        attempt = 0
        full = True
        while True:
            self._client = self.settings.client(attempt)
            try:
                if full:
                    await self._full_sync(self._client)
                    full = False
                await self._watch(self._client, backoff)
            except asyncio.CancelledError:
                raise
            except aetcd.RevisionCompactedError as exc:
                # History we had not seen yet is gone: only a fresh snapshot is trustworthy now.
                self.compactions += 1
                log.warning(
                    "%s mirror: revision %d compacted (%s); full re-sync", self.name, self.revision, exc
                )
                full = True
                continue
            except ETCD_ERRORS as exc:
                self._mark_stale(exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not end the mirror; say it loudly
                log.exception("%s mirror: unexpected error; full re-sync", self.name)
                self._mark_stale(exc)
                full = True
            finally:
                await close_quietly(self._client)
                self._client = None
            attempt += 1
            await asyncio.sleep(backoff.next())

    def _mark_stale(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        if not self.stale:
            log.warning(
                "%s mirror: etcd unavailable or watch broken (%s); serving last snapshot", self.name, reason
            )
        self.stale = True
        self.last_error = reason

    def _mark_fresh(self) -> None:
        if self.stale and self.last_error:
            log.warning("%s mirror: back in sync with etcd at revision %d", self.name, self.revision)
        self.stale = False
        self.last_error = None
        self.last_sync = time.time()

    async def _full_sync(self, client: EtcdClient) -> None:
        revision, items = await asyncio.wait_for(
            client.range_prefixes(self.prefixes), self.settings.timeout * 4
        )
        self._apply(dict(items), True, revision)
        self.revision = revision
        self.full_syncs += 1
        log.info("%s mirror: snapshot at revision %d (%d keys)", self.name, revision, len(items))

    async def _watch(self, client: EtcdClient, backoff: Backoff) -> None:
        """Watch from the revision after the last one seen (resuming after a broken stream)."""
        await asyncio.wait_for(client.check_revision(self.prefixes[0], self.revision), self.settings.timeout)
        async for rev, changes in client.watch_prefixes(self.prefixes, self.revision + 1):
            if changes:
                self._apply(dict(changes), False, rev)  # later events for a key win: dict keeps the last
            self.revision = max(self.revision, rev)
            if not self.synced.is_set() or self.stale:
                self._mark_fresh()
                self.synced.set()
                backoff.reset()
        raise ConnectionError("watch stream ended")
