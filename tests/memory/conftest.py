"""Fixtures: a real mem0 over real embedded Qdrant in a tmp folder, offline embedder;
the memory service on the session's nats-server (requests only, no ledger consumer)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from jetmesh.bus.connection import connect
from jetmesh.memory import MemorySettings, MemoryStore
from jetmesh.memory.client import MemoryClient
from jetmesh.memory.service import MemoryService
from nats.aio.client import Client as NATS

T = TypeVar("T")


@pytest.fixture
def settings(tmp_path: Path) -> MemorySettings:
    return MemorySettings(data_dir=tmp_path / "data", embedder="hash", hash_dims=256)


@pytest.fixture
async def store(settings: MemorySettings) -> AsyncIterator[MemoryStore]:
    s = await MemoryStore.open(settings)
    yield s
    await s.close()


@dataclass
class Served:
    service: MemoryService
    store: MemoryStore
    client: MemoryClient
    """A client on a connection of its own (not the service's)."""
    url: str


@pytest.fixture
async def served(bus, store: MemoryStore) -> AsyncIterator[Served]:
    """The memory service answering requests on the session's server."""
    service = MemoryService(bus.nc, bus.js, store, episodes=False)
    await service.start()
    nc = await connect(bus.url)
    yield Served(service, store, MemoryClient(nc), bus.url)
    await nc.close()
    await service.stop()


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


async def new_connection(url: str) -> NATS:
    return await connect(url)
