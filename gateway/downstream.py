"""The client-facing HTTP/1.1 server protocol: httptools, one ``Exchange`` per request, no ASGI on the hot path.

uvicorn runs the listener (sockets, signals, graceful shutdown) with this protocol as its ``http`` protocol
(``GatewayHttpProtocol.configured``). Each request becomes an ``Exchange`` handed to a ``handler`` (the proxy); WebSocket upgrades go to
uvicorn's WebSocket protocol and the ASGI app, as in uvicorn's own HTTP protocol. What a front proxy needs on
top: a header size limit (431), a deadline for receiving a request head (408, against slowloris), JSON
errors for malformed requests (400), keep-alive with an idle timeout, pipelining in order, and backpressure
both ways.
"""

from __future__ import annotations

import asyncio
import collections
import http
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final

import httptools

from gateway.headers import Header
from gateway.watchdog import Watchdog
from gateway.writes import HeldWrites, WriteBatch

log = logging.getLogger("zonemesh.gateway")

HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024


def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %b\r\n" % (code, phrase)


STATUS_LINE: Final = {code: _status_line(code) for code in range(100, 600)}
_NO_BODY_STATUS: Final = frozenset({204, 304})
_METHODS: Final = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
JSON_HEADERS: Final[list[Header]] = [(b"content-type", b"application/json")]


def error_body(code: str, message: str, request_id: bytes | None) -> bytes:
    """The JSON body of every error the gateway answers itself."""
    rid = request_id.decode() if request_id else None
    return json.dumps({"error": code, "message": message, "request_id": rid}).encode()


class ClientGone(Exception):
    """The client closed the connection."""


class _HeadersTooLarge(Exception):
    pass


class Exchange:
    """One request on a client connection: its head, its body (``read_body``) and the response
    (``respond`` -> ``write``* -> ``end``).

    While it is in flight it sits in uvicorn's ``server_state.tasks``: a graceful shutdown that runs out of
    time calls ``cancel``, as it does for tasks.
    """

    __slots__ = (
        "method", "raw_path", "query", "headers", "client_ip", "client_ip_b", "scheme", "keep_alive", "head_only",
        "disconnected", "response_started", "response_complete", "body_complete", "_proto", "_chunks",
        "_buffered", "_waiter", "_expect_continue", "_chunked", "_task",
    )  # fmt: skip

    def __init__(self, proto: GatewayHttpProtocol, method: str, raw_path: bytes, query: bytes,
                 headers: list[Header], keep_alive: bool, expect_continue: bool) -> None:  # fmt: skip
        self.method = method
        self.raw_path = raw_path
        self.query = query
        self.headers = headers  # names lower-cased, in arrival order
        self.client_ip = proto.client_ip
        self.client_ip_b = proto.client_ip_b
        self.scheme = proto.scheme
        self.keep_alive = keep_alive
        self.head_only = method == "HEAD"
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.body_complete = False
        self._proto = proto
        self._chunks: collections.deque[bytes] | None = None
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._expect_continue = expect_continue
        self._chunked = False
        self._task: asyncio.Task[None] | None = None

    # --- the request body -------------------------------------------------------------------------------
    async def read_body(self) -> bytes | None:
        """The next chunk of the request body, or None at its end. Raises ClientGone."""
        while True:
            chunks = self._chunks
            if chunks:
                chunk = chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered < LOW_WATER:
                    self._proto._resume()
                return chunk
            if self.body_complete:
                return None
            if self.disconnected:
                raise ClientGone("client closed the connection while sending the body")
            if self._expect_continue:
                self._expect_continue = False
                if not self.response_started:
                    self._proto.held.write_now(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._waiter = self._proto.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _feed(self, body: bytes) -> None:
        if self.response_complete:
            return  # answered already (e.g. 413): the rest of the body is read and dropped
        if self._chunks is None:
            self._chunks = collections.deque()
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER:
            self._proto._pause()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the response -----------------------------------------------------------------------------------
    def respond(self, status: int, headers: list[Header], body: bytes = b"", end: bool = True) -> None:
        """Send the status line and headers (lower-case names), with ``body``; ``end=False`` streams the rest
        with ``write``. Without a Content-Length the length is set (``end``) or the body is chunked."""
        parts = [STATUS_LINE[status]]  # (one join of all the parts: the cheapest way to build a head here)
        has_length = False
        for header in headers:
            name = header[0]
            if name == b"content-length":
                has_length = True
            elif name == b"connection":
                if header[1].lower() == b"close":
                    self.keep_alive = False
                continue
            parts.append(name)
            parts.append(b": ")
            parts.append(header[1])
            parts.append(b"\r\n")
        self._send(status, parts, has_length, body, end)

    def respond_lines(self, status: int, lines: list[bytes], has_length: bool, body: bytes) -> None:
        """``respond`` with the whole body and the header lines formatted already ("name: value\\r\\n" each,
        no Connection header among them)."""
        lines.insert(0, STATUS_LINE[status])
        self._send(status, lines, has_length, body, True)

    def _send(self, status: int, parts: list[bytes], has_length: bool, body: bytes, end: bool) -> None:
        """Send the response head begun in ``parts`` (status line and header lines), and ``body``."""
        if self.response_started:
            raise RuntimeError("response already started")
        self.response_started = True
        no_body_status = status in _NO_BODY_STATUS or status < 200
        bodyless = self.head_only or no_body_status
        if not has_length and not no_body_status:
            if end:
                parts.append(b"content-length: %d\r\n" % len(body))
            elif self._proto.http11:
                parts.append(b"transfer-encoding: chunked\r\n")
                self._chunked = not bodyless
            else:
                self.keep_alive = False  # HTTP/1.0 without a length: the end of the body is the close
        if self._proto.shutting_down or (end and not self.body_complete):
            self.keep_alive = False
        if not self.keep_alive:
            parts.append(b"connection: close\r\n\r\n")
        elif not self._proto.http11:
            parts.append(b"connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        if body and not bodyless:
            if self._chunked:
                parts.append(b"%x\r\n" % len(body))
                parts.append(body)
                parts.append(b"\r\n")
            else:
                parts.append(body)
        if not self.disconnected:
            self._proto.held.write(b"".join(parts))
        if end:
            self._finish()

    async def write(self, data: bytes) -> None:
        """Send a chunk of the response body, waiting while the client is slower than the upstream."""
        if self.disconnected or not data or self.head_only:
            return
        proto = self._proto
        if self._chunked:
            proto.held.write_now(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            proto.held.write_now(data)
        if proto.drain is not None:
            await proto.drain

    def end(self) -> None:
        """The response is complete."""
        if self._chunked and not self.disconnected:
            self._proto.held.write(b"0\r\n\r\n")
        self._finish()

    def abort(self) -> None:
        """The response cannot be completed (the upstream failed mid-body): close the connection."""
        self.keep_alive = False
        self.response_complete = True
        self._proto._response_done(self)
        if not self.disconnected:
            self._proto.close()

    def _finish(self) -> None:
        if not self.response_complete:
            self.response_complete = True
            self._proto._response_done(self)

    # --- the handler ------------------------------------------------------------------------------------
    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Go on serving this exchange in a task running ``coro``."""
        self._task = task = self._proto.loop.create_task(coro)
        task.add_done_callback(self._handler_done)

    def cancel(self, msg: str | None = None) -> None:
        """A graceful shutdown ran out of time: stop serving this exchange."""
        if self._task is not None:
            self._task.cancel(msg)
        elif not self.response_complete:  # (answered soon: uvicorn is iterating over its tasks)
            self._proto.loop.call_soon(self.fail, None, True)

    def fail(self, exc: BaseException | None, cancelled: bool = False) -> None:
        """Serving this exchange failed (``exc``, a bug) or was cancelled: the client still gets an end."""
        if exc is not None:
            log.error("request handler failed", exc_info=exc)
        if self.response_complete:
            return
        if not self.response_started and not self.disconnected:
            if cancelled and self._proto.shutting_down:
                status, code, message = 503, "shutting_down", "the gateway is shutting down"
            else:
                status, code, message = 500, "internal_error", "the gateway failed to answer"
            self.respond(status, JSON_HEADERS, error_body(code, message, None))
        else:
            self.abort()

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        cancelled = task.cancelled()
        exc = None if cancelled else task.exception()
        if exc is not None or not self.response_complete:
            self.fail(exc, cancelled)


# Serves an exchange: answers it, or leaves it to callbacks that will, or returns a coroutine that will (run
# as a task). Async functions are handlers too.
Handler = Callable[[Exchange], Coroutine[Any, Any, None] | None]


class GatewayHttpProtocol(asyncio.Protocol):
    """One client connection; uvicorn makes them through the factory ``configured`` returns."""

    @classmethod
    def configured(
        cls, handler: Handler, max_header_bytes: int, header_timeout: float
    ) -> Callable[..., GatewayHttpProtocol]:
        """A protocol factory for uvicorn's ``http=`` (called with uvicorn's config and server state)."""

        batch = WriteBatch()  # (one per server: the answers of a loop round go out together)

        def make(config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> GatewayHttpProtocol:  # fmt: skip
            return cls(
                config, server_state, app_state, _loop, handler, max_header_bytes, header_timeout, batch
            )

        return make

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None, handler: Handler, max_header_bytes: int,
                 header_timeout: float, batch: WriteBatch | None = None) -> None:  # fmt: skip
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout
        if not config.loaded:
            config.load()
        self.config = config
        self.server_state = server_state
        self._tasks: set[Any] = server_state.tasks  # (a set, typed: cheaper to use per request)
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.keepalive_timeout = config.timeout_keep_alive
        self.parser = httptools.HttpRequestParser(self)
        try:
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        except AttributeError:  # httptools < 0.6.3
            pass
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.held = HeldWrites(batch or WriteBatch())  # responses, sent at the end of the loop round
        self.client_ip = ""
        self.client_ip_b = b""
        self.scheme = "http"
        self.http11 = True
        self.shutting_down = False
        self.drain: asyncio.Future[None] | None = None
        self.current: Exchange | None = None  # being answered
        self.receiving: Exchange | None = None  # its body is arriving (later than ``current`` when pipelined)
        self.pipeline: collections.deque[Exchange] = collections.deque()
        self._paused = False
        self._url = b""
        self._headers: list[Header] = []
        self._head_bytes = 0
        self._raw_head = 0
        self._head_since: float | None = None
        self._idle_since: float | None = None
        self._watchdog = Watchdog(self.loop, self._check)  # request-head deadline and keep-alive idle timeout

    # --- asyncio.Protocol -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.held.transport = transport
        self.server_state.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else ""
        self.client_ip_b = self.client_ip.encode()
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self._idle_since = now = self.loop.time()
        self._watchdog.by(now + self.keepalive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self._watchdog.cancel()
        for ex in (self.current, self.receiving, *self.pipeline):
            if ex is not None:
                ex.disconnected = True
                ex._wake()
        self.pipeline.clear()
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)
        self.drain = None

    def pause_writing(self) -> None:
        if self.drain is None:
            self.drain = self.loop.create_future()

    def resume_writing(self) -> None:
        drain, self.drain = self.drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def close(self) -> None:
        """Close the connection once what is held is written."""
        self.held.flush()
        self.transport.close()

    def shutdown(self) -> None:
        """Graceful shutdown (uvicorn calls it): close when idle, else after the current response."""
        self.shutting_down = True
        if self.current is None:
            self.close()
        else:
            self.current.keep_alive = False

    def data_received(self, data: bytes) -> None:
        self._idle_since = None
        try:
            self.parser.feed_data(data)
            if self._head_since is not None:
                # Still no complete head: everything received belongs to it (httptools buffers a header value
                # whole before calling on_header, so count raw bytes too).
                self._raw_head += len(data)
                if self._raw_head > self.max_header_bytes:
                    raise httptools.HttpParserCallbackError("head too large") from _HeadersTooLarge()
            else:
                self._raw_head = 0
        except httptools.HttpParserUpgrade:
            self._upgrade()
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadersTooLarge) or isinstance(exc.__cause__, _HeadersTooLarge):
                self.reject(431, "headers_too_large", f"request head exceeds {self.max_header_bytes} bytes")
            else:
                self.reject(400, "bad_request", f"malformed HTTP request: {exc}")

    # --- httptools callbacks ----------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._head_since = now = self.loop.time()
        self._watchdog.by(now + self.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.max_header_bytes:
            raise _HeadersTooLarge()
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.max_header_bytes:
            raise _HeadersTooLarge()
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._head_since = None
        parser = self.parser
        if parser.should_upgrade() and self._is_websocket():
            return  # handed to the WebSocket protocol when httptools raises HttpParserUpgrade
        url = self._url
        if url[:1] == b"/" and url.find(b"#") < 0:  # (find: "in" tries the bytes as an int first)
            path, _, query = url.partition(b"?")
        else:  # absolute-form, asterisk-form or a fragment
            try:
                parsed = httptools.parse_url(url)
                path, query = parsed.path or b"/", parsed.query or b""
            except httptools.HttpParserInvalidURLError:
                path, query = url, b""
        expect = False
        has_body = False
        has_connection = False
        for name, value in self._headers:
            if name == b"expect" and value.lower() == b"100-continue":
                expect = True
            elif name == b"transfer-encoding" or (name == b"content-length" and value.strip(b" \t0")):
                has_body = True
            elif name == b"connection":
                has_connection = True
        keep_alive = parser.should_keep_alive()
        # Kept alive with no Connection header: HTTP/1.1 (get_http_version formats a string: not for every request)
        self.http11 = (keep_alive and not has_connection) or parser.get_http_version() == "1.1"
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        ex = Exchange(self, method, path, query, self._headers, keep_alive, expect)
        ex.body_complete = not has_body  # (a request without a length or chunking ends with its head)
        self.receiving = ex
        if self.current is None:
            self._start(ex)
        else:
            self.pipeline.append(ex)
            self._pause()

    def on_body(self, body: bytes) -> None:
        ex = self.receiving
        if ex is not None:
            ex._feed(body)

    def on_message_complete(self) -> None:
        ex = self.receiving
        if ex is not None:
            ex.body_complete = True
            ex._wake()

    # --- exchanges --------------------------------------------------------------------------------------
    def _start(self, ex: Exchange) -> None:
        self.current = ex
        self._tasks.add(ex)  # uvicorn cancels these when a graceful shutdown runs out of time
        try:
            coro = self.handler(ex)
        except Exception as exc:
            ex.fail(exc)
            return
        if coro is not None:
            ex.run(coro)

    def _response_done(self, ex: Exchange) -> None:
        self._tasks.discard(ex)
        if ex is not self.current:
            return
        self.current = None
        if not ex.keep_alive or self.shutting_down or not ex.body_complete:
            # (a request body still arriving after the answer is not read to its end: the connection closes)
            if not ex.disconnected:
                self.close()
            return
        if self.pipeline:
            self._start(self.pipeline.popleft())
            if not self.pipeline:
                self._resume()
        else:
            self._idle_since = now = self.loop.time()
            self._watchdog.by(now + self.keepalive_timeout)
            self._resume()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and not self.pipeline:
            self._paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    # --- WebSocket --------------------------------------------------------------------------------------
    def _is_websocket(self) -> bool:
        if self.config.ws_protocol_class is None:
            return False
        for name, value in self._headers:
            if name == b"upgrade" and value.lower() == b"websocket":
                return True
        return False

    def _upgrade(self) -> None:
        if not self._is_websocket():
            return  # another protocol (h2c, ...): answered as plain HTTP/1.1
        self.server_state.connections.discard(self)
        self._watchdog.cancel()
        head = [self.parser.get_method(), b" ", self._url, b" HTTP/1.1\r\n"]
        for name, value in self._headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        protocol = self.config.ws_protocol_class(
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        self.held.flush()
        protocol.connection_made(self.transport)
        protocol.data_received(b"".join(head))
        self.transport.set_protocol(protocol)

    # --- timeouts and rejects ---------------------------------------------------------------------------
    def _check(self) -> None:
        """The watchdog fired: a request head too slow (408), an idle connection (closed), or neither yet."""
        now = self.loop.time()
        if self._head_since is not None and now - self._head_since >= self.header_timeout:
            self.reject(408, "request_timeout", f"request head not received within {self.header_timeout}s")
        elif self._idle_since is not None and now - self._idle_since >= self.keepalive_timeout:
            self.close()
        else:
            if self._head_since is not None:
                self._watchdog.by(self._head_since + self.header_timeout)
            if self._idle_since is not None:
                self._watchdog.by(self._idle_since + self.keepalive_timeout)

    def reject(self, status: int, code: str, message: str) -> None:
        """Answer a request the parser refused (or that came too slowly) and close the connection."""
        self._head_since = self._idle_since = None
        if self.transport is None or self.transport.is_closing():
            return
        if self.current is not None and self.current.response_started:
            self.close()  # mid-response: the client cannot tell an error from the body
            return
        if self.current is not None:
            self.current.keep_alive = False
            self.current.disconnected = True  # its handler must not write after our answer
        body = error_body(code, message, None)
        self.held.write_now(
            b"%bcontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%b"
            % (STATUS_LINE[status], len(body), body)
        )
        self.close()
