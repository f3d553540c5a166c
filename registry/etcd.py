"""etcd access: connection settings, a TLS/multi-endpoint aware client, paged ranges and raw watches."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aetcd
import grpc
from aetcd import rpc

DEFAULT_PREFIX = "/zonemesh"
RPC_TIMEOUT = 3.0
_PAGE = 1000
_CHANNEL_OPTIONS = {
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    # Reconnect fast after an etcd restart instead of gRPC's default backoff of up to 2 minutes.
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2_000,
}

# Errors that mean "etcd is unreachable or the call failed": callers retry with backoff.
ETCD_ERRORS: tuple[type[BaseException], ...] = (
    aetcd.ClientError,
    grpc.RpcError,
    asyncio.TimeoutError,
    OSError,
)


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd: endpoints (host:port, tried in turn), TLS files, credentials, key prefix."""

    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    prefix: str = DEFAULT_PREFIX
    timeout: float = RPC_TIMEOUT

    def __post_init__(self) -> None:
        eps = tuple(_normalise_endpoint(e) for e in self.endpoints if e.strip())
        if not eps:
            raise ValueError("etcd endpoints: at least one host:port is required")
        object.__setattr__(self, "endpoints", eps)
        prefix = "/" + self.prefix.strip("/")
        if prefix == "/":
            raise ValueError("etcd prefix: must not be empty or '/'")
        object.__setattr__(self, "prefix", prefix)
        if bool(self.username) != bool(self.password):
            raise ValueError("etcd username and password must be given together")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("etcd cert and key files must be given together")

    @property
    def tls(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    @classmethod
    def from_env(cls, **overrides: object) -> EtcdSettings:
        """Settings from ``ZONEMESH_ETCD_*`` environment variables, then explicit overrides (None skipped)."""
        env = os.environ
        values: dict[str, object] = {
            "endpoints": tuple(env.get("ZONEMESH_ETCD_ENDPOINTS", "127.0.0.1:2379").split(",")),
            "ca_file": env.get("ZONEMESH_ETCD_CA") or None,
            "cert_file": env.get("ZONEMESH_ETCD_CERT") or None,
            "key_file": env.get("ZONEMESH_ETCD_KEY") or None,
            "username": env.get("ZONEMESH_ETCD_USERNAME") or None,
            "password": env.get("ZONEMESH_ETCD_PASSWORD") or None,
            "prefix": env.get("ZONEMESH_PREFIX", DEFAULT_PREFIX),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values["endpoints"], str):
            values["endpoints"] = tuple(str(values["endpoints"]).split(","))
        return cls(**values)  # type: ignore[arg-type]

    def client(self, attempt: int = 0) -> EtcdClient:
        """A new (not yet connected) client for endpoint number ``attempt`` (modulo the endpoint count)."""
        host, port = self.endpoints[attempt % len(self.endpoints)].rsplit(":", 1)
        return EtcdClient(self, host.strip("[]"), int(port))

    def env(self) -> dict[str, str]:
        """The ``ZONEMESH_ETCD_*`` variables that reproduce these settings in a child process."""
        out = {"ZONEMESH_ETCD_ENDPOINTS": ",".join(self.endpoints), "ZONEMESH_PREFIX": self.prefix}
        for name, value in (
            ("CA", self.ca_file),
            ("CERT", self.cert_file),
            ("KEY", self.key_file),
            ("USERNAME", self.username),
            ("PASSWORD", self.password),
        ):
            if value:
                out[f"ZONEMESH_ETCD_{name}"] = value
        return out


def _normalise_endpoint(endpoint: str) -> str:
    ep = endpoint.strip()
    for scheme in ("http://", "https://"):
        if ep.startswith(scheme):
            ep = ep[len(scheme) :]
    ep = ep.rstrip("/")
    host, sep, port = ep.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {endpoint!r}: expected host:port")
    return ep


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as fh:
        return fh.read()


class EtcdClient(aetcd.Client):
    """aetcd client with TLS (CA, client cert) support and our channel options (keepalive, big ranges)."""

    def __init__(self, settings: EtcdSettings, host: str, port: int) -> None:
        super().__init__(
            host=host,
            port=port,
            username=settings.username,
            password=settings.password,
            timeout=settings.timeout,
            options=dict(_CHANNEL_OPTIONS),
        )
        self.settings = settings
        self.endpoint = f"{host}:{port}"

    async def connect(self) -> None:  # noqa: D401 - overrides aetcd to add TLS
        if self._connected.is_set():
            return
        if not self.settings.tls:
            await super().connect()
            return
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(self.settings.ca_file),
            private_key=_read(self.settings.key_file),
            certificate_chain=_read(self.settings.cert_file),
        )
        self.channel = rpc.secure_channel(self.endpoint, creds, options=list(self._options.items()))
        if self._username:
            stub = rpc.AuthStub(self.channel)
            resp = await stub.Authenticate(
                rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout
            )
            self.metadata = (("token", resp.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()

    async def range_prefixes(self, prefixes: Sequence[str]) -> tuple[int, list[tuple[str, bytes]]]:
        """All key/values under ``prefixes`` at one revision, paged so big registries never hit gRPC limits."""
        await self.connect()
        revision = 0
        items: list[tuple[str, bytes]] = []
        try:
            for prefix in prefixes:
                key = prefix.encode()
                end = aetcd.utils.prefix_range_end(key)
                while True:
                    req = rpc.RangeRequest(key=key, range_end=end, limit=_PAGE, revision=revision)
                    resp = await self.kvstub.Range(req, timeout=self._timeout, metadata=self.metadata)
                    if not revision:
                        revision = resp.header.revision
                    items.extend((kv.key.decode(), kv.value) for kv in resp.kvs)
                    if not resp.more or not resp.kvs:
                        break
                    key = resp.kvs[-1].key + b"\0"
        except grpc.aio.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)
        return revision, items

    async def check_revision(self, prefix: str, revision: int) -> None:
        """Raise ``aetcd.RevisionCompactedError`` when ``revision`` was compacted away (a cheap count-only read)."""
        await self.connect()
        key = prefix.encode()
        req = rpc.RangeRequest(
            key=key, range_end=aetcd.utils.prefix_range_end(key), count_only=True, revision=revision
        )
        try:
            await self.kvstub.Range(req, timeout=self._timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.OUT_OF_RANGE and "compacted" in (exc.details() or ""):
                raise aetcd.RevisionCompactedError(0) from None
            aetcd.exceptions._handle_exception(exc)

    async def watch_prefixes(
        self, prefixes: Sequence[str], start_revision: int
    ) -> AsyncIterator[tuple[int, list[tuple[str, bytes | None]]]]:
        """Yield ``(revision, [(key, value-or-None-for-delete), ...])`` for changes from ``start_revision``.

        Progress notifications are requested and yielded as empty batches so the caller's revision stays
        fresh. Raises ``aetcd.RevisionCompactedError`` when history is gone and ``WatchCanceled`` when etcd
        cancels the watch; a broken stream raises the gRPC/aetcd error.
        """
        await self.connect()
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[rpc.WatchRequest]:
            for prefix in prefixes:
                key = prefix.encode()
                yield rpc.WatchRequest(
                    create_request=rpc.WatchCreateRequest(
                        key=key,
                        range_end=aetcd.utils.prefix_range_end(key),
                        start_revision=start_revision,
                        progress_notify=True,
                    )
                )
            await stop.wait()

        call = rpc.WatchStub(self.channel).Watch(requests(), metadata=self.metadata)
        try:
            async for resp in call:
                if resp.compact_revision:
                    raise aetcd.RevisionCompactedError(resp.compact_revision)
                if resp.canceled:
                    raise WatchCanceled(resp.cancel_reason or "watch canceled by etcd")
                changes = [
                    (ev.kv.key.decode(), ev.kv.value if ev.type == rpc.Event.PUT else None)
                    for ev in resp.events
                ]
                yield resp.header.revision, changes
        except grpc.aio.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)
        finally:
            stop.set()
            call.cancel()


class WatchCanceled(aetcd.ClientError):
    """etcd canceled our watch (e.g. it is overloaded or our auth token expired)."""


async def close_quietly(client: aetcd.Client | None) -> None:
    """Close a client, ignoring errors from a dead connection."""
    if client is None:
        return
    try:
        await asyncio.wait_for(client.close(), 2)
    except Exception:  # noqa: BLE001 - closing a broken channel may fail in many ways
        pass


class Backoff:
    """Exponential backoff with jitter: ``next()`` gives the next sleep, ``reset()`` after a success."""

    def __init__(self, base: float = 0.1, cap: float = 2.0) -> None:
        self.base, self.cap, self._delay = base, cap, base

    def next(self) -> float:
        delay = random.uniform(self._delay / 2, self._delay)
        self._delay = min(self.cap, self._delay * 2)
        return delay

    def reset(self) -> None:
        self._delay = self.base
