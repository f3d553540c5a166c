"""Small asyncio helpers shared by the long-running tasks."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("zonemesh")


async def cancel_and_wait(task: asyncio.Task | None, patience: float = 10.0) -> None:
    """Cancel ``task`` (if any) and wait until it has finished.

    The cancellation is repeated until the task ends: on Python 3.11 ``asyncio.wait_for`` swallows a
    cancellation that arrives just as the awaited call completes, and a task looping around such a call would
    otherwise run on (and this wait would never end). Gives up, with a warning, after ``patience`` seconds.
    """
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while not task.done():
        if loop.time() >= deadline:
            log.warning("task %s did not stop within %ss of being cancelled", task.get_name(), patience)
            return
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
    if not task.cancelled() and task.exception() is not None:
        log.debug("task %s ended with %r", task.get_name(), task.exception())
