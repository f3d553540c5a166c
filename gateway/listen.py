"""Listening sockets for our servers."""

from __future__ import annotations

import socket


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one), inheritable by worker processes.

    The socket is created with ``IPPROTO_TCP`` explicitly: asyncio only sets TCP_NODELAY on accepted sockets
    whose ``proto`` says TCP, and without it Nagle + delayed ACKs add ~40 ms to every keep-alive response.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock
