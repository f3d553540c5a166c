"""WebSocket tunnelling: accept the client's ASGI websocket, open one to the upstream, relay both ways."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.downstream import JSON_HEADERS, error_body
from gateway.proxy import _WS_SKIP, HOP_HEADER, REQUEST_ID_RE, _Request, new_request_id

if TYPE_CHECKING:
    from gateway.proxy import ProxyApp

log = logging.getLogger("zonemesh.gateway")


async def proxy_websocket(app: ProxyApp, scope: dict[str, Any], receive: Any, send: Any) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    host = b""
    rid = None
    hopped = False
    protocols: list[str] = []
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
        elif name == b"x-request-id":
            rid = value
        elif name == HOP_HEADER:
            hopped = True
        elif name == b"sec-websocket-protocol":
            protocols += [p.strip() for p in value.decode("latin-1").split(",") if p.strip()]
        if name not in _WS_SKIP and name != b"x-request-id":
            headers[name.decode("latin-1")] = value.decode("latin-1")
    if rid is None or not REQUEST_ID_RE.match(rid):
        rid = new_request_id()
    headers["x-request-id"] = rid.decode()
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    client = scope.get("client")
    req = _Request(
        "GET", raw_path, query, scope["headers"], client[0] if client else "", scope.get("scheme", "ws")
    )
    req.host, req.rid = host, rid
    routed = app.route(host, raw_path)
    if routed is None:
        return await _reject(app, send, scope, req, 404, "no_route", "no route for this websocket", "")
    service, upstream_path = routed
    tried = []
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, connect=app.config.connect_timeout)
    )
    try:
        while True:
            ep = app.pick(service, tried, hopped, None)
            if ep is None:
                return await _reject(app, send, scope, req, 503, "no_healthy_upstream",
                                     f"service {service!r} has no healthy instance", service)  # fmt: skip
            remote = ep.zone != app.zone
            path = raw_path if remote else upstream_path
            url = f"ws://{ep.address}{path.decode('latin-1')}" + (
                f"?{query.decode('latin-1')}" if query else ""
            )
            hdrs = dict(headers)
            if remote:
                hdrs[HOP_HEADER.decode()] = app.zone
            try:
                upstream = await session.ws_connect(url, headers=hdrs, protocols=protocols, autoping=True,
                                                    max_msg_size=0)  # fmt: skip
                break
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                app.clusters.report(ep, False)
                tried.append(ep)
                if len(tried) > app.config.connect_retries:
                    return await _reject(app, send, scope, req, 502, "upstream_connect_failed",
                                         f"websocket to {ep.address} failed: {exc}", service)  # fmt: skip
        app.clusters.report(ep, True)
        ep.active += 1
        try:
            await send({"type": "websocket.accept", "subprotocol": upstream.protocol,
                        "headers": [(b"x-request-id", rid)]})  # fmt: skip
            await _relay(upstream, receive, send)
        finally:
            ep.active -= 1
            await upstream.close()
        app._done(req, 101, service, ep, 0, None)
    finally:
        await session.close()


async def _relay(upstream: aiohttp.ClientWebSocketResponse, receive: Any, send: Any) -> None:
    async def client_to_upstream() -> None:
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                await upstream.close(code=msg.get("code", 1000))
                return
            if msg.get("text") is not None:
                await upstream.send_str(msg["text"])
            elif msg.get("bytes") is not None:
                await upstream.send_bytes(msg["bytes"])

    async def upstream_to_client() -> None:
        async for msg in upstream:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await send({"type": "websocket.send", "text": msg.data})
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await send({"type": "websocket.send", "bytes": msg.data})
            else:
                break
        code = upstream.close_code or 1000
        try:
            await send({"type": "websocket.close", "code": code if code != 1006 else 1011})
        except (OSError, RuntimeError):
            pass

    tasks = [asyncio.ensure_future(client_to_upstream()), asyncio.ensure_future(upstream_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _reject(
    app: ProxyApp,
    send: Any,
    scope: dict[str, Any],
    req: _Request,
    status: int,
    code: str,
    message: str,
    service: str,
) -> None:
    """Refuse the handshake with an HTTP error (JSON body) when the server supports it, else close."""
    rid = req.rid
    body = error_body(code, message, rid)
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [*JSON_HEADERS, (b"x-request-id", rid)]})  # fmt: skip
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1011 if status >= 500 else 1008})
    app.metrics.errors[code] += 1
    app._done(req, status, service, None, len(body), code)
