"""Helpers of the memory tests (imported by name; `conftest` is ambiguous across folders)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from jetmesh.memory import MemoryStore
from jetmesh.memory.client import MemoryClient
from jetmesh.memory.service import MemoryService

T = TypeVar("T")


@dataclass
class Served:
    service: MemoryService
    store: MemoryStore
    client: MemoryClient
    """A client on a connection of its own (not the service's)."""
    url: str


async def eventually(probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool],
                     timeout: float = 15.0, what: str = "condition") -> T:
    """Poll `probe` until `ok(result)`, or fail at the deadline with the last result."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g}s; last: {value!r}"[:2000])
        await asyncio.sleep(0.05)
