"""The proxy: a plain ASGI app (no framework on the hot path) that routes, balances and streams.

Request path: header hygiene and limits -> service from ``Host: <svc><suffix>`` or ``/<svc>/`` -> local-zone
endpoint (balancer), else a peer gateway of a zone that has the service (at most one cross-zone hop) ->
upstream pool -> stream both ways -> access log + metrics. Only catalog endpoints are ever dialed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any

from gateway.cluster import ClusterSet, Endpoint
from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.upstream import ConnectFailed, PoolExhausted, UpstreamError, UpstreamReset, build_head
from registry.keys import NAME_RE

access_log = logging.getLogger("zonemesh.access")
log = logging.getLogger("zonemesh.gateway")

HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
        b"te", b"trailer", b"transfer-encoding", b"upgrade", b"expect", b"http2-settings",
    }
)  # fmt: skip
# Request headers we never copy as they come: hop-by-hop ones, and those we set ourselves.
_REQUEST_SKIP = HOP_BY_HOP | {b"content-length", b"x-request-id", b"x-forwarded-for", b"via"}
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
HOP_HEADER = b"x-zonemesh-hop"
ZONE_HEADER = b"x-zonemesh-zone"
REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_WS_SKIP = HOP_BY_HOP | {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
                         b"sec-websocket-protocol"}  # fmt: skip
_STREAM_WATCH_AFTER = 16  # chunks: start watching for a client disconnect on long responses
JSON_HEADERS = [(b"content-type", b"application/json")]


class GatewayError(Exception):
    """An error answered by the gateway itself with a JSON body."""

    def __init__(
        self, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or []


class ProxyApp:
    """The ASGI application of a zone gateway's proxy listener."""

    def __init__(self, config: GatewayConfig, clusters: ClusterSet, metrics: Metrics) -> None:
        self.config = config
        self.clusters = clusters
        self.metrics = metrics
        self.zone = config.zone
        self.zone_b = config.zone.encode()
        self.via = f"1.1 zonemesh-{config.zone}".encode()
        self.suffix = config.host_suffix.encode()
        self.hash_header = config.hash_header.encode()
        self.log_access = config.access_log

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.http(scope, receive, send)
        elif kind == "websocket":
            from gateway.websocket import proxy_websocket

            await proxy_websocket(self, scope, receive, send)
        elif kind == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

    # --- request analysis -------------------------------------------------------------------------------
    def route(self, host: bytes, raw_path: bytes) -> tuple[str, bytes] | None:
        """``(service, path for the instance)`` or None when nothing routes."""
        name = host.rsplit(b":", 1)[0] if not host.endswith(b"]") else host
        name = name.lower()
        if name.endswith(self.suffix):
            service = name[: -len(self.suffix)].decode("latin-1")
            if NAME_RE.match(service):
                return service, raw_path
        if self.config.path_routing and raw_path.startswith(b"/"):
            seg, _, rest = raw_path[1:].partition(b"/")
            service = seg.decode("latin-1")
            if service and self.clusters.known(service):
                if self.config.strip_prefix:
                    return service, b"/" + rest
                return service, raw_path
        return None

    def pick(self, service: str, tried: list[Endpoint], hopped: bool, key: bytes | None) -> Endpoint | None:
        ep = self.clusters.pick_local(service, tried, key)
        if ep is None and not hopped:
            ep = self.clusters.pick_remote(service, tried)
        return ep

    # --- HTTP -------------------------------------------------------------------------------------------
    async def http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        start = time.perf_counter()
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        host = b""
        rid = None
        clen: bytes | None = None
        chunked = False
        hopped = False
        hash_key = None
        conn_tokens: set[bytes] = set()
        fwd_for = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"x-request-id":
                rid = value
            elif name == b"content-length":
                if clen is not None and clen != value:
                    return await self.error(
                        send, scope, start, b"", 400, "bad_request", "conflicting Content-Length"
                    )
                clen = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"connection":
                conn_tokens.update(t.strip().lower() for t in value.split(b","))
            elif name == HOP_HEADER:
                hopped = True
            elif name == b"x-forwarded-for":
                fwd_for = value
            elif name == self.hash_header:
                hash_key = value
        if rid is None or not REQUEST_ID_RE.match(rid):
            rid = uuid.uuid4().hex.encode()
        if clen is not None:
            if chunked:
                return await self.error(send, scope, start, rid, 400, "bad_request",
                                        "Content-Length and Transfer-Encoding together are not allowed")  # fmt: skip
            if not clen.isdigit():
                return await self.error(send, scope, start, rid, 400, "bad_request", "invalid Content-Length")
            body_len = int(clen)
        else:
            body_len = -1 if chunked else 0
        limit = self.config.max_body_bytes
        if limit is not None and body_len > limit:
            return await self.error(send, scope, start, rid, 413, "payload_too_large",
                                    f"request body of {body_len} bytes exceeds the limit of {limit}")  # fmt: skip
        routed = self.route(host, raw_path)
        if routed is None:
            return await self.error(send, scope, start, rid, 404, "no_route",
                                    f"no route for host {host.decode('latin-1')!r} path {raw_path.decode('latin-1')!r}")  # fmt: skip
        service, upstream_path = routed

        # Outgoing headers: everything but hop-by-hop (and what Connection names), plus forwarding headers.
        client = scope.get("client")
        client_ip = client[0] if client else ""
        # Forwarding headers are kept only from a peer gateway (a hop from a known gateway address).
        trusted = hopped and client_ip in self.clusters.gateway_hosts
        skip = _REQUEST_SKIP | conn_tokens if conn_tokens else _REQUEST_SKIP
        out: list[tuple[bytes, bytes]] = []
        via = self.via
        for name, value in scope["headers"]:
            if name in skip:
                if name == b"via":
                    via = value + b", " + self.via
                continue
            if not trusted and (name == b"x-forwarded-proto" or name == b"x-forwarded-host"):
                continue
            out.append((name, value))
        out.append((b"x-request-id", rid))
        out.append(
            (b"x-forwarded-for", fwd_for + b", " + client_ip.encode() if fwd_for else client_ip.encode())
        )
        if not trusted:
            out.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
            if host:
                out.append((b"x-forwarded-host", host))
        out.append((b"via", via))
        if body_len > 0:
            out.append((b"content-length", clen))  # type: ignore[arg-type]
        elif body_len < 0:
            out.append((b"transfer-encoding", b"chunked"))

        tried: list[Endpoint] = []
        connect_retries = self.config.connect_retries
        body_started = False
        last_error: UpstreamError | None = None
        while True:
            ep = self.pick(service, tried, hopped, hash_key)
            if ep is None:
                if last_error is not None:
                    return await self.error(send, scope, start, rid, last_error.status, last_error.code,
                                            str(last_error), service)  # fmt: skip
                where = "in this zone" if hopped else "in any zone"
                return await self.error(send, scope, start, rid, 503, "no_healthy_upstream",
                                        f"service {service!r} has no healthy instance {where}", service)  # fmt: skip
            remote = ep.zone != self.zone
            target = (raw_path if remote else upstream_path) + (b"?" + query if query else b"")
            headers = out + [(HOP_HEADER, self.zone_b)] if remote else out
            ep.active += 1
            conn = None
            try:
                try:
                    conn, reused = await ep.pool.acquire()
                except ConnectFailed as exc:
                    self.clusters.report(ep, False)
                    tried.append(ep)
                    last_error = exc
                    if connect_retries > 0:
                        connect_retries -= 1
                        continue
                    return await self.error(send, scope, start, rid, 502, exc.code, str(exc), service)
                except PoolExhausted as exc:
                    return await self.error(send, scope, start, rid, 503, exc.code, str(exc), service)
                try:
                    conn.send_head(build_head(method, target, headers), method == "HEAD")
                    if body_len:
                        body_started = True
                        await self._send_body(conn, receive, body_len)
                    status, resp_headers = await conn.read_head(self.config.request_timeout)
                except UpstreamReset as exc:
                    conn.close()
                    conn = None
                    if reused and not body_started:
                        continue  # a kept-alive connection the upstream had closed: retry on a fresh one
                    self.clusters.report(ep, False)
                    if not body_started and method in IDEMPOTENT and connect_retries > 0:
                        connect_retries -= 1  # nothing of the request is lost: try another endpoint
                        tried.append(ep)
                        last_error = exc
                        continue
                    return await self.error(send, scope, start, rid, 502, exc.code, str(exc), service)
                except UpstreamError as exc:
                    conn.close()
                    self.clusters.report(ep, False)
                    return await self.error(send, scope, start, rid, exc.status, exc.code, str(exc), service)
                except GatewayError as exc:
                    conn.close()
                    return await self.error(
                        send, scope, start, rid, exc.status, exc.code, exc.message, service
                    )
                self.clusters.report(ep, status < 500)
                sent = await self._relay_response(conn, send, receive, status, resp_headers, rid, ep)
                conn = None
                self._done(scope, start, rid, status, service, ep, sent, None, host)
                return
            finally:
                ep.active -= 1
                if conn is not None:  # the exchange did not finish cleanly (error or cancellation)
                    conn.close()

    async def _send_body(self, conn: Any, receive: Any, body_len: int) -> None:
        """Stream the client's body to the upstream (re-chunked when the client sent it chunked)."""
        chunked = body_len < 0
        limit = self.config.max_body_bytes
        total = 0
        more = True
        timeout = self.config.body_timeout
        while more:
            try:
                async with asyncio.timeout(timeout):
                    message = await receive()
            except TimeoutError:
                raise GatewayError(
                    408, "request_timeout", f"client sent no body data for {timeout}s"
                ) from None
            if message["type"] == "http.disconnect":
                raise GatewayError(
                    499, "client_closed", "client closed the connection while sending the body"
                )
            data = message.get("body", b"")
            more = message.get("more_body", False)
            total += len(data)
            if limit is not None and total > limit:
                raise GatewayError(
                    413, "payload_too_large", f"request body exceeds the limit of {limit} bytes"
                )
            if conn.response_started:
                continue  # the upstream already answered (e.g. an early 413): drop the rest
            if chunked:
                if data:
                    await conn.write(b"%x\r\n%b\r\n" % (len(data), data))
                if not more:
                    await conn.write(b"0\r\n\r\n")
            elif data:
                await conn.write(data)
        if conn.response_started:
            conn.keep_alive = False

    async def _relay_response(
        self, conn: Any, send: Any, receive: Any, status: int, up_headers: list[tuple[bytes, bytes]], rid: bytes,
        ep: Endpoint,
    ) -> int:  # fmt: skip
        """Send the upstream's response to the client, streaming the body; returns body bytes sent."""
        conn_tokens: set[bytes] = set()
        for name, value in up_headers:
            if name.lower() == b"connection":
                conn_tokens.update(t.strip().lower() for t in value.split(b","))
        skip = HOP_BY_HOP | conn_tokens if conn_tokens else HOP_BY_HOP
        headers = []
        via = self.via
        has_zone = False
        for name, value in up_headers:
            lname = name.lower()
            if lname in skip or lname == b"x-request-id":
                continue
            if lname == b"via":
                via = value + b", " + self.via
                continue
            if lname == ZONE_HEADER:
                has_zone = True
            headers.append((lname, value))
        headers.append((b"x-request-id", rid))
        headers.append((b"via", via))
        if not has_zone:
            headers.append((ZONE_HEADER, ep.zone.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        sent = 0
        chunks = 0
        disconnected: asyncio.Task[Any] | None = None
        timeout = self.config.body_timeout
        try:
            while True:
                chunk = await conn.read(timeout)
                if chunk is None:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    break
                sent += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunks += 1
                if chunks == _STREAM_WATCH_AFTER:
                    disconnected = asyncio.ensure_future(_wait_disconnect(receive))
                if disconnected is not None and disconnected.done():
                    conn.close()
                    return sent
        except UpstreamError as exc:
            log.warning(
                "upstream %s failed mid-response (%s); closing the client connection", ep.address, exc
            )
            conn.close()
            self.clusters.report(ep, False)
            return sent
        finally:
            if disconnected is not None:
                disconnected.cancel()
        conn.done()
        return sent

    # --- answers and logs -------------------------------------------------------------------------------
    async def error(
        self, send: Any, scope: dict[str, Any], start: float, rid: bytes, status: int, code: str, message: str,
        service: str = "",
    ) -> None:  # fmt: skip
        """Answer with the JSON error body every gateway error uses."""
        rid = rid or uuid.uuid4().hex.encode()
        body = json.dumps({"error": code, "message": message, "request_id": rid.decode()}).encode()
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), (b"x-request-id", rid)]
        if status in (400, 408, 413, 431):
            headers.append((b"connection", b"close"))
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        except (OSError, RuntimeError):
            pass
        self.metrics.errors[code] += 1
        self._done(scope, start, rid, status, service, None, len(body), code, None)

    def _done(
        self, scope: dict[str, Any], start: float, rid: bytes, status: int, service: str, ep: Endpoint | None,
        sent: int, error: str | None, host: bytes | None,
    ) -> None:  # fmt: skip
        elapsed = time.perf_counter() - start
        zone = ep.zone if ep is not None else self.zone
        self.metrics.observe(service or "-", zone, status, elapsed)
        if self.log_access:
            client = scope.get("client")
            entry = {
                "ts": round(time.time(), 3),
                "request_id": rid.decode(),
                "client": client[0] if client else None,
                "method": scope.get("method"),
                "host": (host or b"").decode("latin-1"),
                "path": scope.get("path"),
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


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
