"""Fixtures: a real mem0 over real embedded Qdrant in a tmp folder, offline embedder;
the memory service on the session's nats-server (requests only, no ledger consumer)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from memory_helpers import Served

from jetmesh.bus.connection import connect
from jetmesh.memory import MemorySettings, MemoryStore
from jetmesh.memory.client import MemoryClient
from jetmesh.memory.service import MemoryService


@pytest.fixture
def settings(tmp_path: Path) -> MemorySettings:
    return MemorySettings(data_dir=tmp_path / "data", embedder="hash", hash_dims=256)


@pytest.fixture
async def store(settings: MemorySettings) -> AsyncIterator[MemoryStore]:
    s = await MemoryStore.open(settings)
    yield s
    await s.close()


@pytest.fixture
async def served(bus, store: MemoryStore) -> AsyncIterator[Served]:  # type: ignore[no-untyped-def]
    """The memory service answering requests on the session's server."""
    service = MemoryService(bus.nc, bus.js, store, episodes=False)
    await service.start()
    nc = await connect(bus.url)
    yield Served(service, store, MemoryClient(nc), bus.url)
    await nc.close()
    await service.stop()
