"""One lazily re-armed timer per connection, for deadlines that are set on every request and almost never hit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Watchdog:
    """Calls ``check`` no later than the earliest deadline asked of it with ``by``. Asking for a later deadline
    than the one already armed costs nothing, so a request pays neither for arming nor for cancelling a timer;
    ``check`` looks at what is still due when it runs and calls ``by`` again for it."""

    __slots__ = ("_loop", "_check", "_handle", "_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, check: Callable[[], None]) -> None:
        self._loop = loop
        self._check = check
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    def by(self, when: float) -> None:
        """Make sure ``check`` runs by loop time ``when``."""
        if self._handle is None or self._at > when:
            if self._handle is not None:
                self._handle.cancel()
            self._at = when
            self._handle = self._loop.call_at(when, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._check()
