"""Helpers for the A2A tests (a module name of its own: no clash with other conftests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from jetmesh.bus.ledger import Ledger
from jetmesh.bus.server import EmbeddedNats


@dataclass
class Bus:
    server: EmbeddedNats
    nc: NATS
    js: JetStreamContext
    ledger: Ledger

    @property
    def url(self) -> str:
        return self.server.url


LOG_SEQ_BASE = 1 << 40
"""Where the steps' logs' sequences start once they live in a stream of their own."""


def ledger_seqs(entries: Iterable[Any]) -> list[int]:
    """The sequences of a task's ledger entries an A2A stream carries: its events, step
    lines, control and approvals (the steps' logs, model calls and read-only tool calls,
    are not A2A task events)."""
    return [e.seq for e in entries if e.seq < LOG_SEQ_BASE]


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
                ) -> float:
    """Poll an observable condition; returns the seconds it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start
