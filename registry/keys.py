"""The etcd key layout (DESIGN.md), under a configurable prefix."""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(kind: str, value: str) -> str:
    """Validate a service or zone name (a DNS label); raise ValueError naming ``kind``."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(f"{kind} {value!r}: must be a DNS label (a-z, 0-9, '-', at most 63 characters)")
    return value


def check_id(kind: str, value: str) -> str:
    """Validate an instance or gateway id; raise ValueError naming ``kind``."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise ValueError(f"{kind} {value!r}: must be 1-128 of A-Z a-z 0-9 . _ - (starting alnum)")
    return value


class Keys:
    """Builds and parses keys below one prefix (``/zonemesh`` by default)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = "/" + prefix.strip("/")
        self.services = f"{self.prefix}/services/"
        self.gateways = f"{self.prefix}/gateways/"
        self.policy = f"{self.prefix}/policy/"
        self.status = f"{self.prefix}/status/gateways/"

    def instance(self, service: str, zone: str, instance_id: str) -> str:
        return f"{self.services}{service}/{zone}/{instance_id}"

    def gateway(self, zone: str, gateway_id: str) -> str:
        return f"{self.gateways}{zone}/{gateway_id}"

    def gateway_status(self, gateway_id: str) -> str:
        return f"{self.status}{gateway_id}"

    def parse_instance(self, key: str) -> tuple[str, str, str]:
        """``(service, zone, instance_id)`` of an instance key; ValueError when it does not fit the layout."""
        parts = _split(key, self.services, 3)
        return (
            check_name("service", parts[0]),
            check_name("zone", parts[1]),
            check_id("instance id", parts[2]),
        )

    def parse_gateway(self, key: str) -> tuple[str, str]:
        """``(zone, gateway_id)`` of a gateway key; ValueError when it does not fit the layout."""
        parts = _split(key, self.gateways, 2)
        return check_name("zone", parts[0]), check_id("gateway id", parts[1])


def _split(key: str, base: str, count: int) -> list[str]:
    if not key.startswith(base):
        raise ValueError(f"key {key!r} is not under {base}")
    parts = key[len(base) :].split("/")
    if len(parts) != count:
        raise ValueError(f"key {key!r}: expected {count} segments below {base}")
    return parts
