"""The proxy: routes, balances and streams each request the HTTP protocol (``gateway.downstream``) hands it.

Request path: header hygiene and limits -> policy route (or the default ``Host: <svc><suffix>`` / ``/<svc>/``
routing) -> route filters (rate limit, fault, redirect, direct response, rewrite, headers, mirror) -> service
policy (rate limit, breaker) -> local-zone endpoint, else a peer gateway of a zone that has the service (the
first gateway decides; the peer only delivers) -> upstream pool with retries and timeouts -> stream both ways
-> access log + metrics. Only catalog endpoints are ever dialed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import re
import time
from collections.abc import Coroutine
from typing import Any, Final
from urllib.parse import parse_qsl

from gateway.cluster import ClusterSet, Endpoint
from gateway.config import GatewayConfig
from gateway.downstream import JSON_HEADERS, ClientGone, Exchange, error_body
from gateway.headers import Header
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter, retry_after_header
from gateway.upstream import (
    ConnectFailed,
    Connection,
    HeadListener,
    PoolExhausted,
    UpstreamAnswered,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
    build_head,
)
from policy.compile import CompiledRoute, RoutingTable
from policy.models import HeaderOps, RateLimit, RetryPolicy, ServicePolicy
from registry.keys import NAME_RE

access_log = logging.getLogger("zonemesh.access")
log = logging.getLogger("zonemesh.gateway")

HOP_BY_HOP: Final = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
        b"te", b"trailer", b"transfer-encoding", b"upgrade", b"expect", b"http2-settings",
    }
)  # fmt: skip
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
HOP_HEADER: Final = b"x-zonemesh-hop"
SERVICE_HEADER: Final = b"x-zonemesh-service"
SUBSET_HEADER: Final = b"x-zonemesh-subset"
ZONE_HEADER: Final = b"x-zonemesh-zone"
# Request headers we never copy as they come: hop-by-hop ones, those we set ourselves, and our hop metadata.
_REQUEST_SKIP: Final = HOP_BY_HOP | {
    b"content-length", b"x-request-id", b"x-forwarded-for", b"via", HOP_HEADER, SERVICE_HEADER, SUBSET_HEADER,
}  # fmt: skip
_RESPONSE_SKIP: Final = HOP_BY_HOP | {b"x-request-id", b"via"}
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close"})  # Connection values that name no other header
REQUEST_ID_RE: Final = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_WS_SKIP: Final = HOP_BY_HOP | {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
                         b"sec-websocket-protocol"}  # fmt: skip
_MIRROR_BODY_MAX: Final = 64 * 1024
_CACHE_SIZE: Final = 4096  # entries of the per-Host and per-service caches (cleared when full)
_RID_PREFIX: Final = os.urandom(8).hex().encode()
_rid_counter: Final = itertools.count(1 << 63)  # (16 hex digits from the start)
_perf_counter: Final = time.perf_counter  # (module attributes called per request: read once)


def new_request_id() -> bytes:
    """A request id unique across processes and restarts: random per process, then a counter (cheap)."""
    return _RID_PREFIX + b"%x" % next(_rid_counter)


class GatewayError(Exception):
    """An error answered by the gateway itself with a JSON body."""

    def __init__(self, status: int, code: str, message: str, headers: list[Header] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or []


class _Request:
    """What the proxy learned from a request's head, in one pass over its headers."""

    __slots__ = (
        "ex", "headers", "start", "method", "raw_path", "query", "host", "rid", "clen", "chunked", "hopped",
        "hop_service", "hop_subset", "conn_tokens", "fwd_for", "client_ip", "scheme", "body_len",
    )  # fmt: skip

    def __init__(self, method: str, raw_path: bytes, query: bytes, headers: list[Header],
                 client_ip: str, scheme: str = "http", ex: Exchange | None = None) -> None:  # fmt: skip
        self.ex = ex
        self.start = _perf_counter()
        self.method = method
        self.raw_path = raw_path
        self.query = query
        self.headers = headers
        self.client_ip = client_ip
        self.scheme = scheme
        self.host = b""
        self.rid = b""
        self.clen: bytes | None = None
        self.chunked = self.hopped = False
        self.hop_service: bytes | None = None
        self.hop_subset: bytes | None = None
        self.conn_tokens: set[bytes] | None = None
        self.fwd_for: bytes | None = None
        self.body_len = 0

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class _Forwarding(HeadListener):
    """One request's way to its upstreams: what to send, and the tries so far (for retries and budgets). Sent
    from a callback, it is the connection's listener for the response head."""

    __slots__ = (
        "req", "service", "retry", "subset", "path", "target", "headers", "timeout", "idle_timeout", "local_only",
        "hash_key", "mirror_to", "mirror_body", "resp_ops", "tried", "retries_left", "body_started", "last_error",
        "in_retry", "picked", "lines", "framing", "app", "sent_to", "head",
    )  # fmt: skip

    def __init__(self, app: ProxyApp, req: _Request, service: str, retry: _Retry) -> None:
        self.app = app
        self.req = req
        self.service = service
        self.retry = retry
        self.subset: dict[str, str] | None = None
        self.path = b""  # for the upstream, without the query
        self.target = b""
        self.headers: list[Header] = []  # the client's, and ours unless ...
        self.lines = b""  # ... they are formatted here
        self.framing = b""  # the body's Content-Length or chunking, formatted
        self.timeout = 0.0
        self.idle_timeout = 0.0
        self.local_only = False
        self.hash_key: bytes | None = None
        self.mirror_to: str | None = None  # the service a copy goes to
        self.mirror_body: list[bytes] | None = None
        self.resp_ops: HeaderOps | None = None
        self.tried: list[Endpoint] = []
        self.retries_left = retry.attempts
        self.body_started = False
        self.last_error: UpstreamError | None = None
        self.in_retry = False
        self.picked: Endpoint | None = None  # chosen already, for the next try (balancers pick once per try)
        self.sent_to: Endpoint | None = None  # where the request went from a callback ...
        self.head: _HeadFuture | None = None  # ... and its response head to come

    def head_in(self, conn: Connection) -> None:
        self.app._on_head(self, conn)


class _Retry:
    """A retry policy as the request path reads it (pydantic attributes are slow to read)."""

    __slots__ = ("policy", "attempts", "per_try_timeout", "statuses")

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.attempts: int = policy.attempts
        self.per_try_timeout: float | None = policy.per_try_timeout
        self.statuses: frozenset[int] = frozenset(policy.retriable_status_codes)


class _ServicePlan:
    """What the request path reads of a service's policy, read once (pydantic attributes are slow to read)."""

    __slots__ = (
        "rate_limit",
        "max_requests",
        "retry",
        "timeout",
        "idle_timeout",
        "zone_failover",
        "hash_header",
    )

    def __init__(self, policy: ServicePolicy) -> None:
        self.rate_limit: RateLimit | None = policy.rate_limit
        self.max_requests: int = policy.circuit_breaker.max_requests
        self.retry = _Retry(policy.retries)
        self.timeout: float = policy.timeouts.request
        self.idle_timeout: float = policy.timeouts.idle
        self.zone_failover: bool = policy.zone_failover
        self.hash_header: bytes | None = (
            policy.hash_header.encode() if policy.balancer == "ring_hash" else None
        )


_HeadFuture = asyncio.Future[tuple[int, list[Header]]]
_Pending = tuple[Endpoint, Connection, _HeadFuture]  # a request sent, and its response head to come


class ProxyApp:
    """A zone gateway's proxy: ``handle`` serves HTTP exchanges; as an ASGI app it serves WebSocket upgrades."""

    def __init__(self, config: GatewayConfig, clusters: ClusterSet, metrics: Metrics) -> None:
        self.config = config
        self.clusters = clusters
        self.metrics = metrics
        self.limiter = RateLimiter()
        self.zone = config.zone
        self.zone_b = config.zone.encode()
        self.via = f"1.1 zonemesh-{config.zone}".encode()
        self.suffix = config.host_suffix.encode()
        self.log_access = config.access_log
        self._background: set[asyncio.Task[None]] = set()
        self._host_services: dict[bytes, str] = {}  # Host header -> service, for <service><suffix> hosts
        self._plans: dict[str, _ServicePlan] = {}
        self._plans_table: RoutingTable | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """ASGI, for what the HTTP protocol hands over: WebSocket upgrades (HTTP goes to ``handle``)."""
        kind = scope["type"]
        if kind == "websocket":
            from gateway.websocket import proxy_websocket

            await proxy_websocket(self, scope, receive, send)
        elif kind == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

    # --- request analysis -------------------------------------------------------------------------------
    def route(self, host: bytes, raw_path: bytes) -> tuple[str, bytes] | None:
        """Default routing: ``(service, path for the instance)`` or None when nothing routes."""
        service = self._host_services.get(host)
        if service is not None:
            return service, raw_path
        name = host.rsplit(b":", 1)[0] if not host.endswith(b"]") else host
        name = name.lower()
        if name.endswith(self.suffix):
            service = name[: -len(self.suffix)].decode("latin-1")
            if NAME_RE.match(service):
                if len(self._host_services) >= _CACHE_SIZE:
                    self._host_services.clear()
                self._host_services[host] = service
                return service, raw_path
        if self.config.path_routing and raw_path.startswith(b"/"):
            seg, _, rest = raw_path[1:].partition(b"/")
            service = seg.decode("latin-1")
            if service and self.clusters.known(service):
                if self.config.strip_prefix:
                    return service, b"/" + rest
                return service, raw_path
        return None

    def pick(
        self,
        service: str,
        tried: list[Endpoint],
        local_only: bool,
        key: bytes | None,
        subset: dict | None = None,
    ) -> Endpoint | None:
        ep = self.clusters.pick_local(service, tried, key, subset)
        if ep is None and not local_only:
            ep = self.clusters.pick_remote(service, tried, subset)
        return ep

    def _parse(self, req: _Request) -> None:
        rid = None
        for name, value in req.headers:
            if name == b"host":
                req.host = value
            elif name == b"x-request-id":
                rid = value
            elif name == b"content-length":
                if req.clen is not None and req.clen != value:
                    raise GatewayError(400, "bad_request", "conflicting Content-Length")
                req.clen = value
            elif name == b"transfer-encoding":
                req.chunked = True
            elif name == b"connection":
                req.conn_tokens = {t.strip().lower() for t in value.split(b",")}
            elif name == HOP_HEADER:
                req.hopped = True
            elif name == SERVICE_HEADER:
                req.hop_service = value
            elif name == SUBSET_HEADER:
                req.hop_subset = value
            elif name == b"x-forwarded-for":
                req.fwd_for = value
        req.rid = rid if rid is not None and REQUEST_ID_RE.match(rid) else new_request_id()
        if req.clen is not None:
            if req.chunked:
                raise GatewayError(
                    400, "bad_request", "Content-Length and Transfer-Encoding together are not allowed"
                )
            if not req.clen.isdigit():
                raise GatewayError(400, "bad_request", "invalid Content-Length")
            req.body_len = int(req.clen)
        elif req.chunked:
            req.body_len = -1
        limit = self.config.max_body_bytes
        if limit is not None and req.body_len > limit:
            raise GatewayError(
                413, "payload_too_large", f"request body of {req.body_len} bytes exceeds the limit of {limit}"
            )

    # --- HTTP -------------------------------------------------------------------------------------------
    def handle(self, ex: Exchange) -> Coroutine[Any, Any, None] | None:
        """Serve one client request (the HTTP protocol's handler). Most are answered from the upstream
        connection's callback; what has to wait (a request body, a retry, a fault delay, a streamed
        response) goes on in a coroutine, returned for the protocol to run."""
        req = _Request(ex.method, ex.raw_path, ex.query, ex.headers, ex.client_ip, ex.scheme, ex)
        try:
            self._parse(req)
        except GatewayError as exc:
            self.error(req, exc.status, exc.code, exc.message)
            return None
        trusted_hop = req.hopped and req.client_ip in self.clusters.gateway_hosts
        route: CompiledRoute | None = None
        if not (trusted_hop and req.hop_service):
            table = self.clusters.table
            if table.routes:
                route = table.match(req.method, _host_name(req.host), req.raw_path.decode("latin-1"),
                                    _headers_dict(req.headers) if table.needs_headers else {},
                                    _query_dict(req.query) if req.query else None)  # fmt: skip
            if route is not None and route.spec.fault is not None:
                delay = route.spec.fault.delay
                if delay is not None and random.random() * 100 < delay.percent:
                    return self._delayed(delay.duration, req, ex, trusted_hop, route)
        return self._serve(req, ex, trusted_hop, route)

    async def _delayed(
        self, seconds: float, req: _Request, ex: Exchange, trusted_hop: bool, route: CompiledRoute
    ) -> None:
        """A route's injected delay, then the request as usual."""
        await asyncio.sleep(seconds)
        rest = self._serve(req, ex, trusted_hop, route, in_task=True)
        if rest is not None:
            await rest

    def _serve(
        self,
        req: _Request,
        ex: Exchange,
        trusted_hop: bool,
        route: CompiledRoute | None,
        in_task: bool = False,
    ) -> Coroutine[Any, Any, None] | None:
        """Route filters and service policy, then forwarding: from callbacks when nothing has to wait (and
        not ``in_task``: a task must not end before its exchange does)."""
        subset: dict[str, str] | None = None
        if route is not None:
            if self._route_filters(route, req):
                return None
            dest = route.pick_destination()
            service, subset = dest.service, (dest.subset or None)
            upstream_path = _rewrite(route, req.raw_path)
        elif trusted_hop and req.hop_service:
            # A peer gateway already matched the route and chose the service: deliver locally.
            service = req.hop_service.decode("latin-1")
            upstream_path = req.raw_path
            subset = _decode_subset(req.hop_subset)
        else:
            routed = self.route(req.host, req.raw_path)
            if routed is None:
                host_s, path_s = req.host.decode("latin-1"), req.raw_path.decode("latin-1")
                self.error(req, 404, "no_route", f"no route for host {host_s!r} path {path_s!r}")
                return None
            service, upstream_path = routed
        plan = self._plan(service)
        if plan.rate_limit is not None and not trusted_hop:
            if self._rate_limited(plan.rate_limit, f"s/{service}", req, service):
                return None
        active = self.clusters.active_requests[service]
        if active >= plan.max_requests:
            self.error(req, 503, "circuit_open", f"service {service!r} has {active} requests in flight "
                       f"(limit {plan.max_requests})", service)  # fmt: skip
            return None
        spec = route.spec if route is not None else None
        f = _Forwarding(
            self,
            req,
            service,
            _Retry(spec.retries) if spec is not None and spec.retries is not None else plan.retry,
        )
        f.subset = subset
        f.path = upstream_path
        f.target = upstream_path + (b"?" + req.query if req.query else b"")
        f.headers, f.lines = self._request_headers(req, trusted_hop, route)
        if req.body_len > 0:
            f.framing = b"content-length: %b\r\n" % req.clen  # type: ignore[str-format]
        elif req.body_len < 0:
            f.framing = b"transfer-encoding: chunked\r\n"
        f.timeout = spec.timeout if spec is not None and spec.timeout is not None else plan.timeout
        f.idle_timeout = plan.idle_timeout
        f.local_only = req.hopped or not plan.zone_failover
        if plan.hash_header is not None:
            f.hash_key = req.header(plan.hash_header)
        if spec is not None:
            f.resp_ops = spec.response_headers
            if spec.mirror is not None and random.random() * 100 < spec.mirror.percent:
                if req.body_len == 0 or 0 < req.body_len <= _MIRROR_BODY_MAX:
                    f.mirror_body = []
                    f.mirror_to = spec.mirror.service
                else:
                    self.metrics.errors["mirror_skipped_body"] += 1
        self.clusters.active_requests[service] += 1  # (with the breaker's check: nothing in between awaits)
        if not in_task and req.body_len == 0 and f.mirror_to is None and self._send_from_callback(f):
            return None
        return self._forward(f, ex, None)

    def _plan(self, service: str) -> _ServicePlan:
        """``service``'s policy as the request path reads it (made once per routing table)."""
        table = self.clusters.table
        if table is not self._plans_table or len(self._plans) >= _CACHE_SIZE:
            self._plans, self._plans_table = {}, table
        plan = self._plans.get(service)
        if plan is None:
            plan = self._plans[service] = _ServicePlan(table.service_policy(service))
        return plan

    def _send_from_callback(self, f: _Forwarding) -> bool:
        """Send the request on an idle connection and answer from the callback of its response head. False
        when that cannot be done here (no endpoint, no idle connection): the async path takes it."""
        ep = self.pick(f.service, f.tried, f.local_only, f.hash_key, f.subset)
        if ep is None:
            return False
        f.picked = ep  # (for the async path's first try, when it is not sent here)
        conn = ep.pool.idle_connection()
        if conn is None:
            return False
        try:
            conn.send_head(self._head(f, ep), f.req.method == "HEAD")
        except UpstreamReset:
            conn.close()
            return False
        f.picked = None
        ep.active += 1
        f.sent_to = ep
        f.head = conn.read_head(min(f.retry.per_try_timeout or f.timeout, f.timeout))
        conn.on_head = f
        return True

    def _on_head(self, f: _Forwarding, conn: Connection) -> None:
        """The response head (or a failure) arrived for a request sent from a callback."""
        ex, ep, fut = f.req.ex, f.sent_to, f.head
        assert ex is not None and ep is not None and fut is not None
        handed_over = False
        try:
            failed = fut.cancelled() or fut.exception() is not None
            if ex.response_started:  # answered meanwhile (a shutdown that ran out of time)
                conn.close()
                return
            if not failed:
                status, headers = fut.result()
                body = None if _retriable_status(status, f.retry) else conn.complete_body()
                if body is not None:
                    self.clusters.report(ep, status < 500)
                    raw = conn.raw_head
                    lines = None
                    if raw is not None and f.resp_ops is None:
                        lines = self._response_lines(raw, headers, f.req.rid, ep)
                    if lines is not None:
                        ex.respond_lines(status, lines, conn.has_length, body)
                    else:
                        ex.respond(status, self._response_headers(headers, f.req.rid, ep, f.resp_ops), body)
                    conn.done()
                    self._done(f.req, status, f.service, ep, len(body), None)
                    return
            # Anything else (a failure, a retry, a streamed body): the async path goes on from here.
            ex.run(self._forward(f, ex, (ep, conn, fut)))
            handed_over = True
        except Exception as exc:
            conn.close()
            ex.fail(exc)
        finally:
            if not handed_over:
                ep.active -= 1
                self.clusters.active_requests[f.service] -= 1

    def _route_filters(self, route: CompiledRoute, req: _Request) -> bool:
        """Route-level rate limit, faults, redirect and direct response. True when the request was answered."""
        spec = route.spec
        if spec.rate_limit is not None and self._rate_limited(spec.rate_limit, f"r/{route.name}", req, ""):
            return True
        if spec.fault is not None:
            abort = spec.fault.abort
            if abort is not None and random.random() * 100 < abort.percent:
                self.error(req, abort.status, "fault_injected", f"fault injected by route {route.name!r}")
                return True
        if spec.direct_response is not None:
            d = spec.direct_response
            body = d.body.encode()
            headers: list[Header] = [(k.lower().encode(), v.encode()) for k, v in d.headers.items()]
            if not any(k == b"content-type" for k, _ in headers):
                headers.append((b"content-type", b"text/plain; charset=utf-8"))
            headers += [(b"content-length", str(len(body)).encode()), (b"x-request-id", req.rid)]
            req.ex.respond(d.status, headers, body)  # type: ignore[union-attr]
            self._done(req, d.status, "", None, len(body), None)
            return True
        if spec.redirect is not None:
            r = spec.redirect
            scheme = r.scheme or req.scheme
            host = r.host or req.host.decode("latin-1")
            path = r.path or req.raw_path.decode("latin-1")
            location = f"{scheme}://{host}{path}" + (f"?{req.query.decode('latin-1')}" if req.query else "")
            headers = [
                (b"location", location.encode()),
                (b"content-length", b"0"),
                (b"x-request-id", req.rid),
            ]
            req.ex.respond(r.status, headers)  # type: ignore[union-attr]
            self._done(req, r.status, "", None, 0, None)
            return True
        return False

    def _rate_limited(self, rl: RateLimit, scope_key: str, req: _Request, service: str) -> bool:
        if rl.key == "ip":
            key = req.client_ip
        elif rl.key.startswith("header:"):
            key = (req.header(rl.key[7:].encode()) or b"").decode("latin-1")
        else:
            key = ""
        wait = self.limiter.allow(scope_key, key, rl.requests_per_second, rl.burst)
        if wait <= 0:
            return False
        self.error(req, 429, "rate_limited", f"rate limit of {rl.requests_per_second:g}/s (burst {rl.burst}) exceeded",
                   service, [(b"retry-after", retry_after_header(wait))])  # fmt: skip
        return True

    def _request_headers(
        self, req: _Request, trusted: bool, route: CompiledRoute | None
    ) -> tuple[list[Header], bytes]:
        """Outgoing headers: all but hop-by-hop (and what Connection names), plus forwarding headers; those are
        formatted already (the second item) unless the route rewrites headers (then they are in the list)."""
        skip = _REQUEST_SKIP | req.conn_tokens if req.conn_tokens else _REQUEST_SKIP
        out: list[Header] = []
        via = self.via
        for header in req.headers:
            name = header[0]
            if name in skip:
                if name == b"via":
                    via = header[1] + b", " + self.via
                continue
            if not trusted and (name == b"x-forwarded-proto" or name == b"x-forwarded-host"):
                continue
            out.append(header)
        ip = req.ex.client_ip_b if req.ex is not None else req.client_ip.encode()
        fwd_for = req.fwd_for + b", " + ip if req.fwd_for else ip
        spec = route.spec if route is not None else None
        rewrite_host = spec.rewrite.host if spec is not None and spec.rewrite is not None else None
        if spec is None or (spec.request_headers is None and not rewrite_host):
            if trusted:
                lines = b"x-request-id: %b\r\nx-forwarded-for: %b\r\nvia: %b\r\n"
                return out, lines % (req.rid, fwd_for, via)
            proto = b"https" if req.scheme == "https" else b"http"
            host = b"x-forwarded-host: %b\r\n" % req.host if req.host else b""
            lines = b"x-request-id: %b\r\nx-forwarded-for: %b\r\nx-forwarded-proto: %b\r\n%bvia: %b\r\n"
            return out, lines % (req.rid, fwd_for, proto, host, via)
        out.append((b"x-request-id", req.rid))
        out.append((b"x-forwarded-for", fwd_for))
        if not trusted:
            out.append((b"x-forwarded-proto", b"https" if req.scheme == "https" else b"http"))
            if req.host:
                out.append((b"x-forwarded-host", req.host))
        out.append((b"via", via))
        if rewrite_host:
            out = [(n, rewrite_host.encode() if n == b"host" else v) for n, v in out]
        if spec.request_headers is not None:
            out = _apply_header_ops(out, spec.request_headers)
        return out, b""

    async def _forward(self, f: _Forwarding, ex: Exchange, pending: _Pending | None) -> None:
        """Try endpoints until one answers or the retry policy says stop; then relay the response.
        ``pending``: a request already sent from a callback, whose response head (or failure) is in.
        It ends the request's count in ``active_requests`` that ``_serve`` started."""
        active = self.clusters.active_requests
        try:
            while not await self._attempt(f, ex, pending):
                pending = None
        finally:
            active[f.service] -= 1
            if f.in_retry:
                self.clusters.active_retries[f.service] -= 1
        if f.mirror_to is not None and f.mirror_body is not None:
            self._spawn(self._mirror(f.mirror_to, f.req, f.path, f.headers, f.lines, b"".join(f.mirror_body)))

    def _head(self, f: _Forwarding, ep: Endpoint) -> bytes:
        """The request head for ``ep``; a peer gateway also gets the service (and subset) it is for."""
        lines = f.lines + f.framing
        if ep.zone != self.zone:
            lines += b"%b: %b\r\n%b: %b\r\n" % (HOP_HEADER, self.zone_b, SERVICE_HEADER, f.service.encode())
            if f.subset:
                lines += b"%b: %b\r\n" % (SUBSET_HEADER, _encode_subset(f.subset))
        return build_head(f.req.method, f.target, f.headers, lines)

    def _may_retry(self, f: _Forwarding, condition: str) -> bool:
        """Whether the retry policy (conditions, attempts left, retry budget) allows another try."""
        retry = f.retry.policy
        if (
            f.retries_left <= 0
            or condition not in retry.retry_on
            or (f.body_started and condition != "connect-failure")
        ):
            return False
        if condition != "connect-failure" and not (f.req.method in IDEMPOTENT or retry.allow_non_idempotent):
            return False
        active_retries = self.clusters.active_retries
        budget = max(retry.min_retry_concurrency,
                     retry.budget_percent / 100 * self.clusters.active_requests[f.service])  # fmt: skip
        if not f.in_retry and active_retries[f.service] >= budget:
            self.metrics.errors["retry_budget_exhausted"] += 1
            return False
        f.retries_left -= 1
        if not f.in_retry:
            f.in_retry = True
            active_retries[f.service] += 1
        self.metrics.errors["retries"] += 1
        return True

    def _failed(self, f: _Forwarding, ep: Endpoint, exc: UpstreamError, *retry_on: str) -> bool:
        """A try failed: passive health learns it and retries go elsewhere. Then another try if the policy
        allows one for any of ``retry_on`` (False), else the client gets ``exc`` (True: answered)."""
        self.clusters.report(ep, False)
        f.tried.append(ep)
        f.last_error = exc
        for condition in retry_on:
            if self._may_retry(f, condition):
                return False
        self.error(f.req, exc.status, exc.code, str(exc), f.service)
        return True

    async def _attempt(self, f: _Forwarding, ex: Exchange, pending: _Pending | None) -> bool:
        """One try at one endpoint (or the end of one ``pending``). True when the request was answered
        (relayed or an error), False to try again."""
        req, service, subset, retry = f.req, f.service, f.subset, f.retry
        method = req.method
        reused = True
        ep: Endpoint
        conn: Connection | None
        if pending is not None:
            ep, conn, head_fut = pending
            per_try = 0.0
        else:
            found = f.picked or self.pick(service, f.tried, f.local_only, f.hash_key, subset)
            f.picked = None
            if found is None and f.tried and f.last_error is not None:
                found = self.pick(
                    service, [], f.local_only, f.hash_key, subset
                )  # all tried: any healthy one again
            if found is None:
                err = f.last_error
                if err is not None:
                    self.error(req, err.status, err.code, str(err), service)
                    return True
                where = "in this zone" if f.local_only else "in any zone"
                what = f"service {service!r}" + (f" subset {subset}" if subset else "")
                self.error(
                    req, 503, "no_healthy_upstream", f"{what} has no healthy instance {where}", service
                )
                return True
            ep = found
            remaining = req.start + f.timeout - _perf_counter()
            if remaining <= 0:
                self.error(req, 504, "upstream_timeout",
                           f"no response within the request timeout of {f.timeout}s", service)  # fmt: skip
                return True
            per_try = min(retry.per_try_timeout or remaining, remaining)
            head = self._head(f, ep)
            if f.tried and f.last_error is not None:
                await asyncio.sleep(random.uniform(0, min(0.25, 0.025 * 2 ** len(f.tried))))
            ep.active += 1
            conn = ep.pool.idle_connection()
        try:
            if conn is None:
                try:
                    conn, reused = await ep.pool.acquire()
                except ConnectFailed as refused:
                    return self._failed(f, ep, refused, "connect-failure")
                except PoolExhausted as full:
                    self.error(req, 503, full.code, str(full), service)
                    return True
            try:
                if pending is not None:
                    status, resp_headers = await head_fut
                else:
                    conn.send_head(head, method == "HEAD")
                    if req.body_len:
                        f.body_started = True
                        await self._send_body(conn, ex, req.body_len, f.idle_timeout, f.mirror_body)
                    status, resp_headers = await conn.read_head(per_try)
            except UpstreamReset as reset:
                conn.close()
                conn = None
                if reused and not f.body_started:
                    return False  # a kept-alive connection the upstream had closed: retry on a fresh one
                return self._failed(f, ep, reset, "reset")
            except UpstreamTimeout as slow:
                conn.close()
                conn = None
                return self._failed(f, ep, slow, "5xx", "gateway-error")
            except UpstreamError as failure:
                conn.close()
                conn = None
                self.clusters.report(ep, False)
                self.error(req, failure.status, failure.code, str(failure), service)
                return True
            except GatewayError as rejected:
                conn.close()
                conn = None
                self.error(req, rejected.status, rejected.code, rejected.message, service)
                return True
            self.clusters.report(ep, status < 500)
            if _retriable_status(status, retry) and (
                (status >= 500 and self._may_retry(f, "5xx"))
                or (502 <= status <= 504 and self._may_retry(f, "gateway-error"))
                or (status in retry.statuses and self._may_retry(f, "retriable-status-codes"))
            ):
                conn.close()
                conn = None
                f.tried.append(ep)
                f.last_error = UpstreamAnswered(status)
                return False
            out_headers = self._response_headers(resp_headers, req.rid, ep, f.resp_ops)
            body = conn.complete_body()
            if body is not None:
                # All of it is here already (small responses): one write, no streaming.
                ex.respond(status, out_headers, body)
                conn.done()
                sent = len(body)
            else:
                sent = await self._stream_response(conn, ex, status, out_headers, ep, f.idle_timeout)
            conn = None
            self._done(req, status, service, ep, sent, None)
            return True
        finally:
            ep.active -= 1
            if conn is not None:  # the exchange did not finish cleanly (error or cancellation)
                conn.close()

    async def _send_body(
        self, conn: Any, ex: Exchange, body_len: int, timeout: float, tee: list[bytes] | None
    ) -> None:
        """Stream the client's body to the upstream (re-chunked when the client sent it chunked)."""
        chunked = body_len < 0
        limit = self.config.max_body_bytes
        total = 0
        while True:
            try:
                async with asyncio.timeout(timeout):
                    data = await ex.read_body()
            except TimeoutError:
                raise GatewayError(
                    408, "request_timeout", f"client sent no body data for {timeout}s"
                ) from None
            except ClientGone:
                raise GatewayError(
                    499, "client_closed", "client closed the connection while sending the body"
                ) from None
            if data is None:
                if chunked and not conn.response_started:
                    await conn.write(b"0\r\n\r\n")
                break
            total += len(data)
            if limit is not None and total > limit:
                raise GatewayError(
                    413, "payload_too_large", f"request body exceeds the limit of {limit} bytes"
                )
            if tee is not None:
                tee.append(data)
            if conn.response_started:
                continue  # the upstream already answered (e.g. an early 413): drop the rest
            if chunked:
                if data:
                    await conn.write(b"%x\r\n%b\r\n" % (len(data), data))
            elif data:
                await conn.write(data)
        if conn.response_started:
            conn.keep_alive = False

    def _response_headers(
        self, up_headers: list[Header], rid: bytes, ep: Endpoint, ops: HeaderOps | None
    ) -> list[Header]:
        """The upstream's response headers as the client gets them: hop-by-hop ones out, ours in."""
        skip = _RESPONSE_SKIP
        headers: list[Header] = []
        via = self.via
        has_zone = False
        for header in up_headers:  # (names are lower-case)
            name = header[0]
            if name in skip:
                if name == b"via":
                    via = header[1] + b", " + self.via
                elif name == b"connection" and header[1].lower() not in _PLAIN_CONNECTION:
                    # It names more hop-by-hop headers, maybe some already copied.
                    named = {t.strip().lower() for t in header[1].split(b",")}
                    skip = skip | named
                    headers = [h for h in headers if h[0] not in named]
                    has_zone = has_zone and ZONE_HEADER not in named
                continue
            if name == ZONE_HEADER:
                has_zone = True
            headers.append(header)
        headers.append((b"x-request-id", rid))
        headers.append((b"via", via))
        if not has_zone:
            headers.append((ZONE_HEADER, ep.zone_b))
        if ops is not None:
            headers = _apply_header_ops(headers, ops)
        return headers

    def _response_lines(
        self, raw: bytes, headers: list[Header], rid: bytes, ep: Endpoint
    ) -> list[bytes] | None:
        """``_response_headers`` on the head as it arrived: the upstream's header lines kept as they are (runs
        of them, hop-by-hop ones cut out), ours added. None when the head is not laid out as it was parsed,
        one "name: value" CRLF line per header (other spacing, folded lines), or Connection names headers."""
        size = len(raw)
        at = raw.find(b"\r\n") + 2  # (after the status line)
        kept_from = at
        lines: list[bytes] = []
        via = self.via
        has_zone = False
        for header in headers:
            name = header[0]
            colon = at + len(name)
            end = colon + 2 + len(header[1])  # where its CRLF is
            if (
                end + 2 > size
                or raw[colon] != 58
                or raw[colon + 1] != 32
                or raw[end] != 13
                or raw[end + 1] != 10
            ):
                return None
            if name in _RESPONSE_SKIP:
                if name == b"via":
                    via = header[1] + b", " + self.via
                elif name == b"connection" and header[1].lower() not in _PLAIN_CONNECTION:
                    return None
                if kept_from < at:
                    lines.append(raw[kept_from:at])
                kept_from = end + 2
            elif name == ZONE_HEADER:
                has_zone = True
            at = end + 2
        if at != size:
            return None
        if kept_from < at:
            lines.append(raw[kept_from:at])
        lines.append(b"x-request-id: %b\r\nvia: %b\r\n" % (rid, via))
        if not has_zone:
            lines.append(ep.zone_line)
        return lines

    async def _stream_response(
        self,
        conn: Any,
        ex: Exchange,
        status: int,
        headers: list[Header],
        ep: Endpoint,
        timeout: float,
    ) -> int:
        """Send the response head (with what body has arrived), then stream the rest; returns body bytes sent."""
        first = conn.take_buffered()
        ex.respond(status, headers, first, end=False)
        sent = len(first)
        try:
            while True:
                chunk = await conn.read(timeout)
                if chunk is None:
                    break
                sent += len(chunk)
                await ex.write(chunk)
                if ex.disconnected:
                    conn.close()
                    ex.abort()
                    return sent
        except UpstreamError as exc:
            log.warning(
                "upstream %s failed mid-response (%s); closing the client connection", ep.address, exc
            )
            conn.close()
            ex.abort()
            self.clusters.report(ep, False)
            return sent
        ex.end()
        conn.done()
        return sent

    # --- mirroring --------------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _mirror(
        self, service: str, req: _Request, path: bytes, headers: list[Header], lines: bytes, body: bytes
    ) -> None:
        """Fire-and-forget copy of a request to ``service``; the answer is read and dropped."""
        ep = self.pick(service, [], req.hopped, None)
        if ep is None:
            self.metrics.errors["mirror_no_upstream"] += 1
            return
        hdrs = list(headers)  # (without the framing of the original: the copy has its own)
        hdrs.append((b"x-zonemesh-mirror", b"1"))
        if body:
            hdrs.append((b"content-length", str(len(body)).encode()))
        if ep.zone != self.zone:
            hdrs += [(HOP_HEADER, self.zone_b), (SERVICE_HEADER, service.encode())]
        target = path + (b"?" + req.query if req.query else b"")
        conn = None
        try:
            conn, _ = await ep.pool.acquire()
            conn.send_head(build_head(req.method, target, hdrs, lines), req.method == "HEAD")
            if body:
                await conn.write(body)
            await conn.read_head(self.config.request_timeout)
            while await conn.read(self.config.body_timeout) is not None:
                pass
            conn.done()
            conn = None
            self.metrics.errors["mirror_sent"] += 1
        except (UpstreamError, OSError) as exc:
            self.metrics.errors["mirror_failed"] += 1
            log.info("mirror to %s failed: %s", service, exc)
        finally:
            if conn is not None:
                conn.close()

    # --- answers and logs -------------------------------------------------------------------------------
    def error(
        self, req: _Request, status: int, code: str, message: str, service: str = "",
        extra_headers: list[Header] | None = None,
    ) -> None:  # fmt: skip
        """Answer with the JSON error body every gateway error uses."""
        rid = req.rid or new_request_id()
        body = error_body(code, message, rid)
        headers: list[Header] = [*JSON_HEADERS, (b"x-request-id", rid)]
        if extra_headers:
            headers += extra_headers
        if status in (400, 408, 413, 431):
            headers.append((b"connection", b"close"))
        ex = req.ex
        if ex is not None and not ex.response_started:
            ex.respond(status, headers, body)
        elif ex is not None:
            ex.abort()
        self.metrics.errors[code] += 1
        self._done(req, status, service, None, len(body), code)

    def _done(
        self, req: _Request, status: int, service: str, ep: Endpoint | None, sent: int, error: str | None
    ) -> None:
        elapsed = _perf_counter() - req.start
        zone = ep.zone if ep is not None else self.zone
        self.metrics.observe(service or "-", zone, status, elapsed)
        if self.log_access:
            entry = {
                "ts": round(time.time(), 3),
                "request_id": req.rid.decode(),
                "client": req.client_ip or None,
                "method": req.method,
                "host": req.host.decode("latin-1"),
                "path": req.raw_path.decode("latin-1"),
                "status": status,
                "service": service or None,
                "upstream": ep.address if ep else None,
                "upstream_zone": zone if ep else None,
                "bytes": sent,
                "duration_ms": round(elapsed * 1000, 3),
            }
            if error:
                entry["error"] = error
            access_log.info(json.dumps(entry, separators=(",", ":")))


def _retriable_status(status: int, retry: _Retry) -> bool:
    return status >= 500 or status in retry.statuses


def _host_name(host: bytes) -> str:
    h = host.decode("latin-1").lower()
    if h.startswith("["):
        return h.split("]")[0] + "]"
    return h.rsplit(":", 1)[0] if ":" in h else h


def _headers_dict(headers: list[Header]) -> dict[str, str]:
    return {n.decode("latin-1"): v.decode("latin-1") for n, v in headers}


def _query_dict(query: bytes) -> dict[str, str]:
    return dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))


def _rewrite(route: CompiledRoute, raw_path: bytes) -> bytes:
    rw = route.spec.rewrite
    if rw is None or rw.prefix is None:
        return raw_path
    prefix = route.path_value.encode()  # type: ignore[union-attr]
    rest = raw_path[len(prefix) :]
    new = rw.prefix.encode()
    if new.endswith(b"/") and rest.startswith(b"/"):
        rest = rest[1:]
    out = new + rest
    return out if out.startswith(b"/") else b"/" + out


def _apply_header_ops(headers: list[Header], ops: HeaderOps) -> list[Header]:
    drop = {n.lower().encode() for n in ops.remove} | {n.lower().encode() for n in ops.set}
    out: list[Header] = [h for h in headers if h[0] not in drop]
    out += [(n.lower().encode(), v.encode()) for n, v in ops.set.items()]
    out += [(n.lower().encode(), v.encode()) for n, v in ops.add.items()]
    return out


def _encode_subset(subset: dict[str, str]) -> bytes:
    return ",".join(f"{k}={v}" for k, v in sorted(subset.items())).encode()


def _decode_subset(raw: bytes | None) -> dict[str, str] | None:
    if not raw:
        return None
    out = {}
    for part in raw.decode("latin-1").split(","):
        k, _, v = part.partition("=")
        if k:
            out[k] = v
    return out or None
