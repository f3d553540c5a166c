"""Gateway settings (from CLI flags, ``ZONEMESH_*`` env or the YAML config)."""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass, field

from registry.etcd import EtcdSettings


def parse_hostport(value: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) -> (host, port); ValueError naming ``flag``."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{flag}: {value!r} is not HOST:PORT")
    return host, int(port)


@dataclass
class GatewayConfig:
    zone: str
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    admin: tuple[str, int] = ("127.0.0.1", 9901)
    advertise: str | None = None  # address other gateways dial; default: the listen host
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    gateway_id: str = field(default_factory=lambda: f"gw-{socket.gethostname()[:30]}-{secrets.token_hex(3)}")
    workers: int = 1
    # Routing defaults (before policy): Host: <service><host_suffix>, or path prefix /<service>/.
    host_suffix: str = ".mesh"
    path_routing: bool = True
    strip_prefix: bool = True
    balancer: str = "least_request"
    hash_header: str = "x-session-id"
    # Upstream.
    connect_timeout: float = 2.0
    request_timeout: float = 15.0  # until the response head arrives (per try)
    body_timeout: float = 60.0  # max stall between body chunks, either direction
    pool_idle_timeout: float = 60.0
    max_connections: int = 1024  # per endpoint
    max_pending: int = 1024  # requests queued for a connection, per endpoint
    connect_retries: int = 1  # extra tries on another endpoint after a connect failure
    # Client-side limits.
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int | None = None
    header_timeout: float = 10.0
    keepalive_timeout: int = 75
    drain_timeout: float = 20.0  # on SIGTERM: how long in-flight requests may finish before they are cut
    # Health.
    hc_interval: float = 5.0
    hc_timeout: float = 1.0
    hc_healthy: int = 2
    hc_unhealthy: int = 3
    outlier_consecutive: int = 5
    outlier_base_ejection: float = 30.0
    outlier_max_ejection: float = 300.0
    # Registration / observability.
    lease_ttl: int = 10
    access_log: bool = True
    snapshot_dir: str | None = None  # keep the last catalog/policy here; used when etcd is down at start

    def __post_init__(self) -> None:
        checks = [
            ("--workers", self.workers >= 1),
            ("--connect-timeout", self.connect_timeout > 0),
            ("--request-timeout", self.request_timeout > 0),
            ("--body-timeout", self.body_timeout > 0),
            ("--header-timeout", self.header_timeout > 0),
            ("--max-header-bytes", self.max_header_bytes >= 1024),
            ("--max-body-bytes", self.max_body_bytes is None or self.max_body_bytes >= 0),
            ("--connect-retries", 0 <= self.connect_retries <= 10),
            ("--hc-interval", self.hc_interval > 0),
            ("--hc-timeout", self.hc_timeout > 0),
            ("--hc-healthy", self.hc_healthy >= 1),
            ("--hc-unhealthy", self.hc_unhealthy >= 1),
            ("--outlier-consecutive", self.outlier_consecutive >= 1),
            ("--max-connections", self.max_connections >= 1),
        ]
        for flag, ok in checks:
            if not ok:
                raise ValueError(f"{flag}: value out of range")
        if not self.host_suffix.startswith("."):
            raise ValueError(f"--host-suffix: {self.host_suffix!r} must start with '.'")
        self.hash_header = self.hash_header.lower()

    @property
    def advertised_address(self) -> str:
        host = self.advertise or self.listen[0]
        if host in ("0.0.0.0", "::", ""):
            raise ValueError("--advertise: required when listening on a wildcard address")
        return host
