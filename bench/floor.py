"""The floor for a Python proxy on this machine: uvloop + httptools, callbacks only, no features at all (no
routing, no policy, no timeouts, no header hygiene, one upstream). Not a product: a reference row in the
throughput table, so the gateway's numbers can be read against what the runtime itself allows.
``python -m bench.floor LISTEN_PORT UPSTREAM_PORT``."""

from __future__ import annotations

import asyncio
import gc
import sys

import httptools
import uvloop

UPSTREAM = ("127.0.0.1", 0)
IDLE: list[Upstream] = []


class Upstream(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.out: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in IDLE:
            IDLE.remove(self)
        if self.client is not None:  # mid-exchange: the client cannot get its answer
            self.client.transport.close()

    def on_message_begin(self) -> None:
        self.out = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.out += [name, b": ", value, b"\r\n"]

    def on_headers_complete(self) -> None:
        self.out[:0] = [b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code()]
        self.out.append(b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.out.append(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        IDLE.append(self)
        if client is not None:
            client.transport.write(b"".join(self.out))


class Client(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.head = [b"", b" ", b"", b" HTTP/1.1\r\n"]

    def on_url(self, url: bytes) -> None:
        self.head[2] += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head += [name, b": ", value, b"\r\n"]

    def on_message_complete(self) -> None:
        self.head[0] = self.parser.get_method()
        self.head.append(b"\r\n")
        head = b"".join(self.head)
        if IDLE:
            up = IDLE.pop()
            up.client = self
            up.transport.write(head)
        else:
            asyncio.ensure_future(self._dial(head))

    async def _dial(self, head: bytes) -> None:
        _, up = await asyncio.get_running_loop().create_connection(Upstream, *UPSTREAM)
        up.client = self
        up.transport.write(head)


async def main(port: int) -> None:
    gc.freeze()
    server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    UPSTREAM = ("127.0.0.1", int(sys.argv[2]))
    uvloop.run(main(int(sys.argv[1])))
