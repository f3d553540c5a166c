"""A live mirror of etcd prefixes: one consistent snapshot (get at revision R), then a watch from R+1.

A broken stream is resumed from the last revision seen (with backoff, rotating through the endpoints);
when that history was compacted away it takes a full new snapshot. While etcd is unreachable the consumer keeps what it has and
``stale`` is True. Used by the catalog (instances, gateways) and the policy store alike.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import aetcd

from registry.aio import cancel_and_wait
from registry.etcd import ETCD_ERRORS, Backoff, EtcdClient, EtcdSettings, close_quietly

log = logging.getLogger("zonemesh.mirror")

# apply(changes, full, revision): ``full`` means ``changes`` is the complete content of the prefixes.
ApplyFn = Callable[[dict[str, bytes | None], bool, int], None]


class PrefixMirror:
    """Keeps ``apply`` fed with every change under ``prefixes``."""

    def __init__(
        self,
        settings: EtcdSettings,
        prefixes: Sequence[str],
        apply: ApplyFn,
        name: str,
        snapshot_path: str | Path | None = None,
        snapshot_grace: float = 2.0,
        snapshot_write: bool = True,
    ) -> None:
        self.settings = settings
        self.snapshot_path = Path(snapshot_path) if snapshot_path else None
        self.snapshot_grace = snapshot_grace
        self.snapshot_write = snapshot_write  # False: only load it (extra workers of one gateway)
        self.from_snapshot = False  # serving what was saved on disk, etcd not reached since start
        self._raw: dict[str, bytes] = {}
        self._save_handle: asyncio.TimerHandle | None = None
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
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), name=f"mirror-{self.name}")
            if self.snapshot_path is not None and self.snapshot_path.exists():
                loop.call_later(self.snapshot_grace, self._load_snapshot_if_unsynced)

    # --- the on-disk snapshot (DESIGN: a gateway restarted during an etcd outage still routes) ------------
    def _record(self, changes: dict[str, bytes | None], full: bool) -> None:
        if self.snapshot_path is None or not self.snapshot_write:
            return
        if full:
            self._raw = {k: v for k, v in changes.items() if v is not None}
        else:
            for key, value in changes.items():
                if value is None:
                    self._raw.pop(key, None)
                else:
                    self._raw[key] = value
        if self._save_handle is None:  # at most one write a second
            self._save_handle = asyncio.get_running_loop().call_later(1.0, self._save)

    def _save(self) -> None:
        self._save_handle = None
        assert self.snapshot_path is not None
        data = {"revision": self.revision, "saved_at": time.time(),
                "items": {k: base64.b64encode(v).decode() for k, v in self._raw.items()}}  # fmt: skip
        try:
            self.snapshot_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.snapshot_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(self.snapshot_path)
        except OSError as exc:
            log.warning("%s mirror: cannot save snapshot to %s: %s", self.name, self.snapshot_path, exc)

    def _load_snapshot_if_unsynced(self) -> None:
        if self.synced.is_set() or self.snapshot_path is None:
            return
        try:
            data = json.loads(self.snapshot_path.read_text())
            items = {k: base64.b64decode(v) for k, v in data["items"].items()}
            revision = int(data["revision"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error(
                "%s mirror: snapshot %s unreadable (%s); waiting for etcd", self.name, self.snapshot_path, exc
            )
            return
        self._apply(items, True, revision)
        self.revision = revision
        self.from_snapshot = True
        self.synced.set()
        age = time.time() - float(data.get("saved_at", time.time()))
        log.error("%s mirror: etcd unreachable at start; serving the snapshot saved %.0fs ago at revision %d "
                  "(%d keys) from %s until etcd answers", self.name, age, revision, len(items), self.snapshot_path)  # fmt: skip

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
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
        changes: dict[str, bytes | None] = dict(items)
        self._apply(changes, True, revision)
        self.revision = revision
        self._record(changes, True)
        self.from_snapshot = False
        self.full_syncs += 1
        log.info("%s mirror: snapshot at revision %d (%d keys)", self.name, revision, len(items))

    async def _watch(self, client: EtcdClient, backoff: Backoff) -> None:
        """Watch from the revision after the last one seen (resuming after a broken stream)."""
        await asyncio.wait_for(client.check_revision(self.prefixes[0], self.revision), self.settings.timeout)
        async for rev, changes in client.watch_prefixes(self.prefixes, self.revision + 1):
            if changes:
                batch = dict(changes)  # later events for a key win: a dict keeps the last
                self._apply(batch, False, rev)
                self._record(batch, False)
            self.revision = max(self.revision, rev)
            if not self.synced.is_set() or self.stale:
                self._mark_fresh()
                self.synced.set()
                backoff.reset()
        raise ConnectionError("watch stream ended")
