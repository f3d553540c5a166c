"""Registry records stored in etcd: service instances and gateways (JSON with a ``schema`` version)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import socket
import time
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from registry.keys import check_id, check_name

SCHEMA = 1


def new_instance_id(service: str) -> str:
    """An id unique per process start: host, pid and random bits."""
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())[:40] or "host"
    return f"{service}-{host}-{os.getpid()}-{secrets.token_hex(3)}"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal[1] = Field(SCHEMA, alias="schema")

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> _Record:
        """Parse a stored value; raises ValueError with a one-line reason."""
        try:
            return cls.model_validate(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except ValidationError as exc:
            raise ValueError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _check_address(value: str) -> str:
    value = value.strip()
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    label = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    if not re.fullmatch(rf"{label}(\.{label})*", value) or len(value) > 253:
        raise ValueError(f"address {value!r}: must be an IP address or a DNS host name")
    return value


class _Dialable(_Record):
    """What every dialable record has: an id, a zone and an address:port."""

    _id_kind: ClassVar[str] = "id"

    id: str
    zone: str
    address: str
    port: int = Field(ge=1, le=65535)

    @field_validator("zone")
    @classmethod
    def _zone(cls, v: str) -> str:
        return check_name("zone", v)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(cls._id_kind, v)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return _check_address(v)

    @property
    def hostport(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


class Instance(_Dialable):
    """One registered instance of a service (value of ``services/<service>/<zone>/<id>``)."""

    _id_kind: ClassVar[str] = "instance id"

    service: str
    tags: dict[str, str] = Field(default_factory=dict)
    weight: int = Field(100, ge=1, le=10_000)
    version: str = ""
    health_path: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    registered_at: float = Field(default_factory=time.time)

    @field_validator("service")
    @classmethod
    def _service(cls, v: str) -> str:
        return check_name("service", v)

    @field_validator("health_path")
    @classmethod
    def _health_path(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError("health_path must start with '/'")
        return v


class GatewayRecord(_Dialable):
    """One running zone gateway (value of ``gateways/<zone>/<id>``)."""

    _id_kind: ClassVar[str] = "gateway id"

    admin_port: int | None = Field(None, ge=1, le=65535)
    version: str = ""
    config_revision: int = 0
    started_at: float = Field(default_factory=time.time)
