"""Policy models (pydantic v2): routes, per-service destination policy and mesh-wide defaults.

Durations are seconds as numbers or strings with a unit ("250ms", "2s", "1m"). Every model forbids unknown
fields so a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from registry.keys import NAME_RE

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"invalid duration {value!r}: use seconds or a number with ms, s, m or h")
        return float(m.group(1)) * _UNITS[m.group(2)]
    return value


Duration = Annotated[float, BeforeValidator(_duration), Field(gt=0, le=24 * 3600)]
Percent = Annotated[float, Field(ge=0, le=100)]
ServiceName = Annotated[str, Field(pattern=NAME_RE.pattern)]
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header_value(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(
            "must not contain control characters (CR, LF, NUL, ...): they would split the message"
        )
    return value


def _header_name(name: str) -> str:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}")
    return name


HeaderValue = Annotated[str, AfterValidator(_header_value)]
HeaderName = Annotated[str, AfterValidator(_header_name)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _exactly_one(model: BaseModel, fields: tuple[str, ...], what: str) -> None:
    chosen = [f for f in fields if getattr(model, f) is not None]
    if len(chosen) != 1:
        raise ValueError(
            f"{what}: set exactly one of {', '.join(fields)}"
            + (f" (got {', '.join(chosen)})" if chosen else "")
        )


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regex {value!r}: {exc}") from None
    return value


class PathMatch(Strict):
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    _regex = field_validator("regex")(classmethod(lambda cls, v: _check_regex(v)))

    @model_validator(mode="after")
    def _one(self) -> PathMatch:
        _exactly_one(self, ("exact", "prefix", "regex"), "path")
        for v in (self.exact, self.prefix):
            if v is not None and not v.startswith("/"):
                raise ValueError("path exact/prefix must start with '/'")
        return self


class ValueMatch(Strict):
    """Match one header or query parameter by name: exact value, regex, or mere presence (or absence)."""

    name: str = Field(min_length=1, max_length=256)
    exact: str | None = None
    regex: str | None = None
    present: bool | None = None

    _regex = field_validator("regex")(classmethod(lambda cls, v: _check_regex(v)))

    @model_validator(mode="after")
    def _one(self) -> ValueMatch:
        _exactly_one(self, ("exact", "regex", "present"), f"match on {self.name!r}")
        return self


class RouteMatch(Strict):
    hosts: list[str] = Field(default_factory=list, description="exact hosts or '*.suffix' wildcards")
    path: PathMatch | None = None
    methods: list[str] = Field(default_factory=list)
    headers: list[ValueMatch] = Field(default_factory=list)
    query: list[ValueMatch] = Field(default_factory=list)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        out = []
        for h in hosts:
            h = h.strip().lower()
            bare = h[2:] if h.startswith("*.") else h
            if not bare or not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?", bare):
                raise ValueError(f"invalid host {h!r}: a host name or '*.suffix'")
            out.append(h)
        return out

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: list[str]) -> list[str]:
        out = [m.upper() for m in methods]
        for m in out:
            if not re.fullmatch(r"[A-Z]{1,20}", m):
                raise ValueError(f"invalid method {m!r}")
        return out


class Destination(Strict):
    service: ServiceName
    weight: int = Field(100, ge=0, le=10_000)
    subset: dict[str, str] = Field(
        default_factory=dict, description="instance tags to match ('version' = version)"
    )


class Redirect(Strict):
    scheme: Literal["http", "https"] | None = None
    host: HeaderValue | None = None
    path: HeaderValue | None = None
    status: Literal[301, 302, 303, 307, 308] = 302


class DirectResponse(Strict):
    status: int = Field(ge=200, le=599)
    body: str = ""
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)


class HeaderOps(Strict):
    set: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    add: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    remove: list[HeaderName] = Field(default_factory=list)


class Rewrite(Strict):
    prefix: HeaderValue | None = Field(
        None, description="replaces the matched path prefix (route match.path.prefix)"
    )
    host: HeaderValue | None = None


class Mirror(Strict):
    service: ServiceName
    percent: Percent = 100.0


class FaultDelay(Strict):
    percent: Percent
    duration: Duration


class FaultAbort(Strict):
    percent: Percent
    status: int = Field(ge=200, le=599)


class Fault(Strict):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


RetryOn = Literal["connect-failure", "reset", "5xx", "gateway-error", "retriable-status-codes"]


class RetryPolicy(Strict):
    attempts: int = Field(1, ge=0, le=10, description="retries after the first try")
    per_try_timeout: Duration | None = None
    retry_on: list[RetryOn] = Field(default_factory=lambda: ["connect-failure", "reset"])
    retriable_status_codes: list[Annotated[int, Field(ge=100, le=599)]] = Field(default_factory=list)
    allow_non_idempotent: bool = False
    budget_percent: Percent = 20.0
    min_retry_concurrency: int = Field(3, ge=0, le=10_000)


class RateLimit(Strict):
    requests_per_second: float = Field(gt=0, le=1_000_000)
    burst: int = Field(1, ge=1, le=1_000_000)
    key: str = Field("none", description="none (one bucket), ip, or header:<name>")

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if v in ("none", "ip") or (v.startswith("header:") and len(v) > 7):
            return v.lower()
        raise ValueError(f"invalid rate limit key {v!r}: none, ip or header:<name>")


class Timeouts(Strict):
    connect: Duration = 2.0
    request: Duration = 15.0
    idle: Duration = 60.0


class CircuitBreaker(Strict):
    max_connections: int = Field(1024, ge=1, le=1_000_000)
    max_pending: int = Field(1024, ge=0, le=1_000_000)
    max_requests: int = Field(10_000, ge=1, le=1_000_000)


class OutlierDetection(Strict):
    consecutive_failures: int = Field(5, ge=1, le=1000)
    base_ejection: Duration = 30.0
    max_ejection: Duration = 300.0


class HealthCheck(Strict):
    interval: Duration = 5.0
    timeout: Duration = 1.0
    healthy_threshold: int = Field(2, ge=1, le=100)
    unhealthy_threshold: int = Field(3, ge=1, le=100)


class ServicePolicy(Strict):
    """Destination policy for one service (value of ``policy/services/<service>``)."""

    balancer: Literal["least_request", "round_robin", "ring_hash"] = "least_request"
    hash_header: str = "x-session-id"
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retries: RetryPolicy = Field(default_factory=RetryPolicy)
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)
    outlier_detection: OutlierDetection = Field(default_factory=OutlierDetection)
    health_check: HealthCheck = Field(default_factory=HealthCheck)
    rate_limit: RateLimit | None = None
    zone_failover: bool = True


class MeshPolicy(Strict):
    """Mesh-wide settings (value of ``policy/mesh``): defaults merged under every service's own policy."""

    defaults: ServicePolicy = Field(default_factory=ServicePolicy)


class Route(Strict):
    """One route (value of ``policy/routes/<name>``). Exactly one action: destinations, redirect or
    direct_response."""

    priority: int = Field(0, ge=-1000, le=1000)
    match: RouteMatch = Field(default_factory=RouteMatch)
    destinations: list[Destination] | None = Field(None, min_length=1, max_length=32)
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    rewrite: Rewrite | None = None
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    mirror: Mirror | None = None
    fault: Fault | None = None
    timeout: Duration | None = None
    retries: RetryPolicy | None = None
    rate_limit: RateLimit | None = None

    @model_validator(mode="after")
    def _action(self) -> Route:
        _exactly_one(self, ("destinations", "redirect", "direct_response"), "route action")
        if self.destinations is not None and sum(d.weight for d in self.destinations) == 0:
            raise ValueError("destinations: weights must not all be 0")
        if self.rewrite and self.rewrite.prefix is not None:
            if not (self.match.path and self.match.path.prefix):
                raise ValueError("rewrite.prefix needs match.path.prefix")
        return self


KINDS: dict[str, type[Strict]] = {"Route": Route, "Service": ServicePolicy, "Mesh": MeshPolicy}
