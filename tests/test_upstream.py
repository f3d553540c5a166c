"""The upstream connection pool against a scripted HTTP/1.1 server on loopback: reuse, deadlines, stalls."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.upstream import Pool, UpstreamTimeout, build_head


class Scripted:
    """Answers each request (one per line of ``script`` consumed in order) with the given bytes; ``None`` means
    never answer; the connection stays open."""

    def __init__(self, script: list[bytes | None]) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.script:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head.split(b"\r\n", 1)[0])
                answer = self.script.pop(0)
                if answer is not None:
                    writer.write(answer)
                    await writer.drain()
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


async def exchange(pool: Pool, method: str, path: bytes, timeout: float) -> tuple[int, bytes]:
    conn, _ = await pool.acquire()
    try:
        conn.send_head(build_head(method, path, [(b"host", b"x")]), method == "HEAD")
        status, _headers = await conn.read_head(timeout)
        body = b""
        while (chunk := await conn.read(timeout)) is not None:
            body += chunk
        conn.done()
        return status, body
    except BaseException:
        conn.close()
        raise


async def test_connection_is_reused_across_exchanges_including_head() -> None:
    server = Scripted(
        [ok(b"one"), b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", ok(b"three"), ok(b"four")]
    )
    pool = Pool("127.0.0.1", await server.start())
    try:
        assert await exchange(pool, "GET", b"/1", 2) == (200, b"one")
        assert await exchange(pool, "HEAD", b"/2", 2) == (
            200,
            b"",
        )  # no body follows, whatever the length says
        assert await exchange(pool, "GET", b"/3", 2) == (200, b"three")
        assert await exchange(pool, "GET", b"/4", 2) == (200, b"four")
        assert server.connections == 1 and pool.stats.reused == 3
    finally:
        pool.close()
        await server.stop()


async def test_a_shorter_deadline_after_a_longer_one_still_fires_on_time() -> None:
    server = Scripted([ok(b"fast"), None])
    pool = Pool("127.0.0.1", await server.start())
    try:
        assert await exchange(pool, "GET", b"/1", 30) == (
            200,
            b"fast",
        )  # arms the connection's timer at +30 s
        t0 = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="no response head within 0.2s"):
            await exchange(pool, "GET", b"/2", 0.2)
        assert 0.15 < time.monotonic() - t0 < 2
    finally:
        pool.close()
        await server.stop()


async def test_a_stalled_body_times_out() -> None:
    server = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"])
    pool = Pool("127.0.0.1", await server.start())
    try:
        conn, _ = await pool.acquire()
        conn.send_head(build_head("GET", b"/", [(b"host", b"x")]), False)
        status, headers = await conn.read_head(2)
        assert status == 200 and (b"content-length", b"10") in headers  # names come lower-cased
        assert await conn.read(0.3) == b"abc"
        t0 = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="stalled for 0.3s"):
            await conn.read(0.3)
        assert 0.25 < time.monotonic() - t0 < 2
        conn.close()
        assert pool.open_connections == 0
    finally:
        pool.close()
        await server.stop()
