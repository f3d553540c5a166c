"""uvicorn's httptools protocol with the limits a front proxy needs: header size (431) and a deadline for
receiving the request head (408, against slowloris)."""

from __future__ import annotations

import asyncio
import json

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _HeadersTooLarge(Exception):
    pass


class HeadCoalescingTransport:
    """Holds a response head (uvicorn writes it on its own) until the next write, so head and body go out in
    one syscall; if no body write follows in the same loop step, the head is flushed on the next step.
    Every other write, and everything else, goes straight to the real transport."""

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data.startswith(b"HTTP/1.1 ") and data.endswith(b"\r\n\r\n"):
            self._held = data
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the real transport's
        return getattr(self._transport, name)


class GatewayHttpProtocol(HttpToolsProtocol):
    """Set ``max_header_bytes`` and ``header_timeout`` on the class (see ``configured``)."""

    max_header_bytes = 64 * 1024
    header_timeout = 10.0

    @classmethod
    def configured(cls, max_header_bytes: int, header_timeout: float) -> type[GatewayHttpProtocol]:
        return type(
            "GatewayHttpProtocol",
            (cls,),
            {"max_header_bytes": max_header_bytes, "header_timeout": header_timeout},
        )

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadCoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        self._head_bytes = 0
        self._raw_head = 0
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout, self._head_timeout
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self._reject(408, "request_timeout", f"request head not received within {self.header_timeout}s")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_header_bytes:
            raise _HeadersTooLarge()

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The keep-alive timeout (uvicorn's) covers the idle gap; our head deadline restarts on the next byte.

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)
        waiting_for_head = self._head_timer is not None
        try:
            self.parser.feed_data(data)
            if waiting_for_head and self._head_timer is not None:
                # Still no complete head: everything received belongs to it (httptools buffers a header value
                # whole before calling on_header, so count raw bytes too).
                self._raw_head += len(data)
                if self._raw_head > self.max_header_bytes:
                    raise httptools.HttpParserCallbackError("head too large") from _HeadersTooLarge()
            else:
                self._raw_head = 0
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadersTooLarge) or isinstance(exc.__cause__, _HeadersTooLarge):
                self._reject(431, "headers_too_large", f"request head exceeds {self.max_header_bytes} bytes")
            else:
                self._reject(400, "bad_request", f"malformed HTTP request: {exc}")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _reject(self, status: int, code: str, message: str) -> None:
        self._cancel_head_timer()
        if self.transport is None or self.transport.is_closing():
            return
        body = json.dumps({"error": code, "message": message, "request_id": None}).encode()
        reason = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[
            status
        ]
        self.transport.write(
            b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%b"
            % (status, reason, len(body), body)
        )
        self.transport.close()
