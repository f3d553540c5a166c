"""Writes held to the end of an event-loop round, then sent back to back.

uvloop sends each ``transport.write`` at once, so a round that answers 30 requests spreads 60 sends over the
time it takes to compute them, and a peer process that is faster than the gateway (a load generator, an
upstream) goes back to sleep between two of them: every send then pays for waking it. Held to the end of
the round, the sends go out together, the first one wakes the peer and the others find it awake.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

_running_loop: Final = asyncio.get_running_loop
HOLD_MAX: Final = 16 * 1024  # bigger writes are sent at once


class WriteBatch:
    """The transports with writes held this round; ``flush`` (scheduled once a round) sends them."""

    __slots__ = ("_held", "_scheduled")

    def __init__(self) -> None:
        self._held: list[HeldWrites] = []
        self._scheduled = False

    def add(self, held: HeldWrites) -> None:
        self._held.append(held)
        if not self._scheduled:
            self._scheduled = True
            _running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        held, self._held = self._held, []
        for writes in held:
            writes.flush()


class HeldWrites:
    """One transport's writes, held for the end of the round (``write``) and kept in order: a write that must
    not wait goes through ``write_now``, and whatever else must follow them (a close, a hand-over) calls
    ``flush`` first."""

    __slots__ = ("transport", "_batch", "_data")

    def __init__(self, batch: WriteBatch) -> None:
        self.transport: Any = None
        self._batch = batch
        self._data: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if len(data) > HOLD_MAX:  # (a big write costs more than a wake-up: no reason to hold it)
            self.write_now(data)
            return
        held = self._data
        if held is None:
            self._data = [data]
            self._batch.add(self)
        else:
            held.append(data)

    def write_now(self, data: bytes) -> None:
        """Send what is held, then ``data``, now (e.g. a streamed body, where backpressure must apply)."""
        self.flush()
        self._send(data)

    def flush(self) -> None:
        """Send what is held now."""
        held = self._data
        if held is not None:
            self._data = None
            self._send(held[0] if len(held) == 1 else b"".join(held))

    def _send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
