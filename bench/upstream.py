"""A minimal fast upstream for benchmarks (used when nginx is not installed): keep-alive HTTP/1.1,
``/small`` = 100 bytes, ``/big`` = 64 KiB, anything else = 100 bytes. ``python -m bench.upstream PORT``."""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

BODIES = {b"/small": b"x" * 100, b"/big": b"y" * 65536}


def _response(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)


RESPONSES = {k: _response(v) for k, v in BODIES.items()}
DEFAULT = RESPONSES[b"/small"]


class Server(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        path = self.url.split(b"?", 1)[0]
        self.transport.write(RESPONSES.get(path, DEFAULT))
        if not self.parser.should_keep_alive():
            self.transport.close()


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Server, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
