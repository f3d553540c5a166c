"""The upstream HTTP/1.1 client: an asyncio Protocol + httptools parser per connection, pooled per address.

One connection carries one exchange at a time. Bodies stream both ways with backpressure: writes wait for
the socket to drain, and reading pauses while the consumer (the client side) has not taken what we have.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import Iterable
from typing import ClassVar, Final

import httptools

from gateway.headers import Header
from gateway.watchdog import Watchdog
from gateway.writes import HeldWrites, WriteBatch

HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024
_HEAD_TIMEOUT: Final = "no response head within {}s"
_BODY_TIMEOUT: Final = "upstream body stalled for {}s"
_monotonic: Final = time.monotonic  # (called per request: read once)


class UpstreamError(Exception):
    """An exchange with an upstream failed: ``status`` and ``code`` are what the client is answered."""

    STATUS: ClassVar[int] = 502
    CODE: ClassVar[str] = "upstream_reset"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.status = self.STATUS
        self.code = self.CODE


class ConnectFailed(UpstreamError):
    CODE = "upstream_connect_failed"


class UpstreamReset(UpstreamError):
    CODE = "upstream_reset"


class UpstreamTimeout(UpstreamError):
    STATUS = 504
    CODE = "upstream_timeout"


class PoolExhausted(UpstreamError):
    STATUS = 503
    CODE = "circuit_open"


class UpstreamAnswered(UpstreamError):
    """The upstream answered a status the retry policy retries (what the client gets when retries run out)."""

    CODE = "upstream_error"

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status


class HeadListener:
    """Whoever sent a request on a connection and set itself as its ``on_head``: told once, outside the
    parser, when the response head is in or the exchange failed (the alternative to awaiting ``read_head``)."""

    def head_in(self, conn: Connection) -> None:
        raise NotImplementedError


class Connection(asyncio.Protocol):
    """One upstream connection. Use: ``send_head`` -> ``write``* -> ``read_head`` -> ``read``* -> ``done``."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.held = HeldWrites(pool.stats.writes)  # request heads, sent at the end of the loop round
        self.closed = False
        self.uses = 0
        self.idle_since = _monotonic()
        self._loop = asyncio.get_running_loop()
        self._parser: httptools.HttpResponseParser | None = None
        self._drain: asyncio.Future[None] | None = None
        self._head: asyncio.Future[tuple[int, list[Header]]] | None = None
        self._headers: list[Header] = []
        self.has_length = False  # the response head so far has a Content-Length
        self._chunked = False  # ... a chunked Transfer-Encoding
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._active = False  # an exchange is under way
        self._pending: asyncio.Future | None = None  # what the deadline applies to (head or body wait)
        self._deadline = 0.0
        self._timeout = 0.0
        self._timeout_message = ""
        self._watchdog = Watchdog(self._loop, self._check_deadline)
        self._complete = False
        self._error: UpstreamError | None = None
        self._reading_paused = False
        self._head_request = False
        self._until_close = False
        self.keep_alive = False
        self.upgraded = False
        # The response head as it arrived (status line and header lines, each ending in CRLF), when it came
        # whole at the start of one read: a proxy can pass its lines on without formatting them again.
        self.raw_head: bytes | None = None
        self._chunk = b""  # the read being parsed, when the response started at its first byte
        self._started = False  # bytes of the response have been read
        self.on_head: HeadListener | None = None  # (set after ``send_head``)

    # --- asyncio.Protocol -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.held.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or not self._active:
            # Bytes from an idle upstream (or after a HEAD/101 head): it is not speaking HTTP/1.1 as we expect.
            self.close()
            return
        self._chunk = b"" if self._started else data
        self._started = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamReset(f"invalid HTTP response from upstream: {exc}"))
            self.close()
        if self.on_head is not None:
            self._head_news()

    def eof_received(self) -> bool | None:
        if self._until_close and self._head is not None and self._head.done():
            self.keep_alive = False
            self._finish()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._watchdog.cancel()
        if self._until_close and self._head is not None and self._head.done() and exc is None:
            self.keep_alive = False
            self._finish()
        elif self._active and not self._complete:
            self._fail(UpstreamReset("upstream closed the connection" + (f": {exc}" if exc else "")))
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self.pool._forget(self)
        if self.on_head is not None:
            self._head_news()

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # --- httptools callbacks ----------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self.has_length = True
        elif name == b"transfer-encoding" and value.lower().find(b"chunked") >= 0:
            self._chunked = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._headers = []  # an interim response (e.g. 103): skip it, the real one follows
            self.has_length = self._chunked = False
            self._chunk = b""
            return
        chunk = self._chunk
        if chunk:
            end = chunk.find(b"\r\n\r\n")
            self.raw_head = chunk[: end + 2] if end > 0 else None
            self._chunk = b""
        self.keep_alive = parser.should_keep_alive()
        self._until_close = (
            not self._chunked
            and not self.has_length
            and status not in (204, 304)
            and not self._head_request
            and status != 101
        )
        if self._head is not None and not self._head.done():
            self._head.set_result((status, self._headers))
        if self._head_request or status == 101:
            # No body follows (HEAD) or the protocol changes (101): the exchange ends with the head. The parser
            # may still expect a body, so it is dropped; the next exchange gets a fresh one.
            self.upgraded = status == 101
            self._parser = None  # the next exchange gets a fresh parser
            self._finish()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._head is not None and not self._head.done():
            return  # end of an interim 1xx response
        self._finish()

    # --- internal ---------------------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _head_news(self) -> None:
        """Tell ``on_head`` when the head future is done."""
        head = self._head
        listener = self.on_head
        if listener is not None and head is not None and head.done():
            self.on_head = None
            listener.head_in(self)

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # mark retrieved; the reader gets it from read_head
        self._wake()

    # --- the exchange -----------------------------------------------------------------------------------
    def send_head(self, head: bytes, is_head_request: bool) -> None:
        """Start an exchange by writing the request line and headers."""
        self.uses += 1
        self.on_head = None
        if self._parser is None:
            self._parser = httptools.HttpResponseParser(self)
        self._active = True
        self._head = self._loop.create_future()
        self._headers = []
        self.has_length = self._chunked = False
        self._chunks.clear()
        self._buffered = 0
        self._complete = False
        self._error = None
        self._head_request = is_head_request
        self._until_close = False
        self.raw_head = None
        self._started = False
        self.keep_alive = False
        if self.closed or self.transport is None:
            raise UpstreamReset("upstream connection already closed")
        self.held.write(head)

    async def write(self, data: bytes) -> None:
        """Write request body bytes, waiting while the socket buffer is full."""
        if self._error is not None:
            raise self._error
        if self.closed or self.transport is None:
            raise UpstreamReset("upstream closed the connection while we were sending the body")
        self.held.write_now(data)
        if self._drain is not None and not self._drain.done():
            await self._drain

    def read_head(self, timeout: float | None) -> asyncio.Future[tuple[int, list[Header]]]:
        """Await it for the response status and headers (names lower-case); UpstreamTimeout after ``timeout``."""
        head = self._head
        assert head is not None
        if timeout and not head.done():
            self._expect_by(head, timeout, _HEAD_TIMEOUT)
        return head

    def _expect_by(self, fut: asyncio.Future, timeout: float, message: str) -> None:
        """``fut`` fails with UpstreamTimeout(``message`` with ``timeout``) unless done within ``timeout``."""
        self._pending = fut
        self._deadline = deadline = self._loop.time() + timeout
        self._timeout, self._timeout_message = timeout, message
        self._watchdog.by(deadline)

    def _check_deadline(self) -> None:
        fut = self._pending
        if fut is None or fut.done():
            self._pending = None
        elif self._loop.time() >= self._deadline:
            self._pending = None
            fut.set_exception(UpstreamTimeout(self._timeout_message.format(self._timeout)))
            if self.on_head is not None:
                self._head_news()
        else:
            self._watchdog.by(self._deadline)

    @property
    def response_started(self) -> bool:
        return self._head is not None and self._head.done()

    async def read(self, timeout: float | None) -> bytes | None:
        """The next body chunk, or None at the end of the body."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._reading_paused and self._buffered < LOW_WATER and self.transport is not None:
                    self._reading_paused = False
                    self.transport.resume_reading()
                return chunk
            if self._complete:
                return None
            if self._error is not None:
                raise self._error
            self._waiter = waiter = self._loop.create_future()
            if timeout:
                self._expect_by(waiter, timeout, _BODY_TIMEOUT)
            try:
                await waiter
            finally:
                self._waiter = None

    def take_buffered(self) -> bytes:
        """The body bytes that have arrived and not been read yet (b"" when none)."""
        chunks = self._chunks
        if not chunks:
            return b""
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return body

    def complete_body(self) -> bytes | None:
        """The whole response body when all of it has arrived (taking it), else None: then ``read`` it."""
        if not self._complete or self._error is not None:
            return None
        return self.take_buffered()

    @property
    def reusable(self) -> bool:
        return (
            self._complete
            and self.keep_alive
            and not self.closed
            and not self.upgraded
            and self._error is None
        )

    def done(self) -> None:
        """End the exchange: back to the pool when reusable, else closed."""
        self._active = False
        self._head = None
        self._pending = None
        if self.reusable:
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        self._watchdog.cancel()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self.pool._forget(self)


class Pool:
    """Keep-alive connections to one upstream address, at most ``max_connections`` open at once."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int = 1024,
        max_pending: int = 1024,
        connect_timeout: float = 2.0,
        idle_timeout: float = 60.0,
        stats: PoolStats | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.stats = stats or PoolStats()
        self._idle: collections.deque[Connection] = collections.deque()
        self._open: set[Connection] = set()
        self._waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        self.closed = False

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def idle_connection(self) -> Connection | None:
        """A kept-alive connection ready for an exchange, if there is one (no waiting)."""
        idle = self._idle
        if not idle:
            return None
        now = _monotonic()
        while idle:
            conn = idle.pop()  # most recently used first: warmest connection, lets old ones idle out
            if not conn.closed and now - conn.idle_since < self.idle_timeout:
                self.stats.reused += 1
                return conn
            conn.close()
        return None

    async def acquire(self) -> tuple[Connection, bool]:
        """A connection for one exchange and whether it was reused from the pool."""
        conn = self.idle_connection()
        if conn is not None:
            return conn, True
        if self.closed:
            raise ConnectFailed(f"{self.host}:{self.port} is no longer a known upstream")
        if len(self._open) >= self.max_connections:
            if len(self._waiters) >= self.max_pending:
                raise PoolExhausted(
                    f"{self.host}:{self.port}: {len(self._open)} connections and the queue is full"
                )
            fut: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                conn = await asyncio.wait_for(fut, self.connect_timeout)
            except TimeoutError:
                raise PoolExhausted(
                    f"{self.host}:{self.port}: no connection free within {self.connect_timeout}s"
                ) from None
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
            if conn is not None:
                self.stats.reused += 1
                return conn, True
            # A slot opened up (a connection closed): fall through and connect.
        return await self._connect(), False

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        conn = Connection(self)
        self._open.add(conn)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: conn, self.host, self.port), self.connect_timeout
            )
        except TimeoutError:
            self._forget(conn)
            self.stats.connect_failures += 1
            raise ConnectFailed(
                f"connect to {self.host}:{self.port} timed out after {self.connect_timeout}s"
            ) from None
        except OSError as exc:
            self._forget(conn)
            self.stats.connect_failures += 1
            raise ConnectFailed(f"connect to {self.host}:{self.port} failed: {exc.strerror or exc}") from None
        self.stats.connects += 1
        return conn

    def release(self, conn: Connection) -> None:
        if self.closed or conn.closed:
            conn.close()
            return
        conn.idle_since = _monotonic()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self._idle.append(conn)

    def _forget(self, conn: Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            try:
                self._idle.remove(conn)
            except ValueError:
                pass
            while self._waiters:  # a slot is free: let one waiter connect
                fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_result(None)
                    break

    def evict_idle(self) -> int:
        """Close connections idle longer than ``idle_timeout``; returns how many."""
        now = _monotonic()
        stale = [c for c in self._idle if now - c.idle_since >= self.idle_timeout or c.closed]
        for conn in stale:
            conn.close()
        return len(stale)

    def close(self) -> None:
        """Stop handing out connections; close the idle ones (in-flight exchanges finish, then close)."""
        self.closed = True
        for conn in list(self._idle):
            conn.close()


class PoolStats:
    """Counters shared by all pools of a gateway (and their write batch: requests go out at the end of the
    loop round)."""

    __slots__ = ("connects", "reused", "connect_failures", "writes")

    def __init__(self) -> None:
        self.connects = 0
        self.reused = 0
        self.connect_failures = 0
        self.writes = WriteBatch()


def build_head(method: str, target: bytes, headers: Iterable[Header], lines: bytes = b"") -> bytes:
    """The request line and header block: ``headers``, then ``lines`` (formatted already, each ending in CRLF)."""
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    for header in headers:  # (one join of all the parts: the cheapest way to build a head here)
        parts.append(header[0])
        parts.append(b": ")
        parts.append(header[1])
        parts.append(b"\r\n")
    parts.append(lines)
    parts.append(b"\r\n")
    return b"".join(parts)
