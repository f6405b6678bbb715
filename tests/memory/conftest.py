"""Fixtures: a real mem0 over real embedded Qdrant in a tmp folder, offline embedder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jetmesh.memory import MemorySettings, MemoryStore


@pytest.fixture
def settings(tmp_path: Path) -> MemorySettings:
    return MemorySettings(data_dir=tmp_path / "data", embedder="hash", hash_dims=256)


@pytest.fixture
async def store(settings: MemorySettings) -> AsyncIterator[MemoryStore]:
    s = await MemoryStore.open(settings)
    yield s
    await s.close()
