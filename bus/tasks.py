"""Stopping background tasks when a cancel can be lost (Python 3.11)."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None, retry_s: float = 0.1) -> None:
    """Cancel each task and wait until it has finished; None entries are skipped.

    On Python 3.11 a cancel can be lost: `asyncio.wait_for` swallows it when the future
    it awaits completes in the same turn of the loop (CPython gh-86296, fixed in 3.12 by
    rewriting wait_for). nats-py awaits its publishes and requests through wait_for, so a
    heartbeat or tick loop that runs until cancelled can miss its cancel and run on, and
    a plain ``task.cancel(); await task`` then never returns. So the cancel is repeated
    every `retry_s` until it takes. The tasks' own exceptions are not raised (a stopping
    service has no use for them); the caller's own cancellation still propagates.
    """
    pending = {t for t in tasks if t is not None}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_s)
    for task in tasks:
        if task is not None and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" warning
