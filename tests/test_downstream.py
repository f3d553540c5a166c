"""The client-facing HTTP/1.1 protocol on its own, in process on loopback, with handlers that misbehave."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import types
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest

from gateway.downstream import Exchange, GatewayHttpProtocol
from tests.mesh import raw_request


async def crash(ex: Exchange) -> None:
    raise RuntimeError("bug")


async def forget(ex: Exchange) -> None:
    return None  # never answers


async def crash_mid_body(ex: Exchange) -> None:
    ex.respond(200, [(b"content-length", b"10")], b"12345", end=False)
    await asyncio.sleep(0)
    raise RuntimeError("bug")


async def echo_body(ex: Exchange) -> None:
    body = b""
    while (chunk := await ex.read_body()) is not None:
        body += chunk
    ex.respond(200, [(b"x-path", ex.raw_path), (b"x-query", ex.query)], body)


async def stream(ex: Exchange) -> None:
    ex.respond(200, [], b"head-", end=False)  # (held to the end of the loop round)
    await ex.write(b"body-")  # (written at once: what is held goes first)
    await asyncio.sleep(0.01)
    await ex.write(b"end")
    ex.end()


HANDLERS = {b"/crash": crash, b"/forget": forget, b"/mid": crash_mid_body, b"/stream": stream}


def route(ex: Exchange) -> Coroutine[Any, Any, None] | None:
    if ex.raw_path == b"/now":  # answered in the handler's call, no task
        ex.respond(200, [(b"x-path", ex.raw_path)], b"now")
        return None
    return HANDLERS.get(ex.raw_path, echo_body)(ex)


@pytest.fixture
async def port() -> AsyncIterator[int]:
    config = types.SimpleNamespace(loaded=True, timeout_keep_alive=5, ws_protocol_class=None)
    state = types.SimpleNamespace(connections=set(), tasks=set())
    make = GatewayHttpProtocol.configured(route, 8192, 5.0)
    server = await asyncio.get_running_loop().create_server(lambda: make(config, state, {}), "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.mark.parametrize("path", ["/crash", "/forget"])
async def test_a_handler_that_fails_to_answer_gives_a_500(port: int, path: str) -> None:
    raw = await raw_request(
        port,
        f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500")
    assert json.loads(rest[: rest.index(b"}") + 1])["error"] == "internal_error"
    assert b"x-path: /after" in rest  # the connection goes on serving


async def test_a_handler_that_fails_mid_body_closes_the_connection(port: int) -> None:
    raw = await raw_request(port, b"GET /mid HTTP/1.1\r\nHost: x\r\n\r\n", read_timeout=3)
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"\r\n\r\n12345")  # cut short, then closed


async def test_chunked_request_body_and_query(port: int) -> None:
    raw = await raw_request(
        port,
        b"POST /p?a=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200") and b"x-query: a=1" in raw and raw.endswith(b"\r\n\r\nabcde")


async def test_garbage_never_takes_the_server_down(port: int, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(7)
    valid = b"POST /p?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc"
    for _ in range(150):  # mutated, truncated and spliced requests (bounded, seeded)
        data = bytearray(valid * rng.randint(1, 3))
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(data))
            what = rng.random()
            if what < 0.4:
                data[pos] = rng.randrange(256)
            elif what < 0.7:
                del data[pos : pos + rng.randint(1, 8)]
            else:
                data[pos:pos] = rng.choice(
                    [b"\r\n", b"\x00", b" ", b":", b"\r\n\r\n", b"0\r\n", b"GET / HTTP/1.1"]
                )
        out = await raw_request(port, bytes(data), read_timeout=0.3)
        assert out == b"" or out.startswith(b"HTTP/1.1 "), out[:80]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    raw = await raw_request(port, b"GET /still?ok=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200") and b"x-query: ok=1" in raw


async def test_held_answers_keep_their_order_and_reach_the_client_before_a_close(port: int) -> None:
    start = asyncio.get_running_loop().time()
    raw = await raw_request(
        port,
        b"GET /now HTTP/1.1\r\nHost: x\r\n\r\nGET /stream HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /now HTTP/1.1\r\nHost: x\r\n\r\nGET /now HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        read_timeout=3,
    )
    assert asyncio.get_running_loop().time() - start < 2  # closed by the server, not timed out
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in raw.split(b"HTTP/1.1 200 OK\r\n")[1:]]
    assert bodies == [b"now", b"5\r\nhead-\r\n5\r\nbody-\r\n3\r\nend\r\n0\r\n\r\n", b"now", b"now"]
    assert raw.rsplit(b"HTTP/1.1 200 OK\r\n", 1)[1].find(b"connection: close\r\n") >= 0
