"""Writes held to the end of the loop round: order kept, big writes not held."""

from __future__ import annotations

import asyncio
import socket

from gateway.writes import HOLD_MAX, HeldWrites, WriteBatch


def _available(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        out += chunk


async def test_small_writes_wait_for_the_end_of_the_round_and_a_big_one_takes_them_along() -> None:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, ours)
    held = HeldWrites(WriteBatch())
    held.transport = transport
    held.write(b"a-")
    held.write(b"b-")
    assert _available(peer) == b""  # held
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert _available(peer) == b"a-b-"  # sent when the round ended
    held.write(b"c-")
    big = b"x" * (HOLD_MAX + 1)
    held.write(big)  # sent at once, after what was held
    got = _available(peer)
    assert got.startswith(b"c-x")  # (before the loop ran again)
    for _ in range(100):  # (bounded: the socket buffer may take it in parts)
        got += _available(peer)
        if len(got) >= len(big) + 2:
            break
        await asyncio.sleep(0.01)
    assert got == b"c-" + big
    transport.close()
    peer.close()
