"""Fixtures for the A2A tests: a NATS server of their own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from a2a_support import Bus

from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.ledger import Ledger
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.streams import declare_streams


@pytest.fixture(scope="module")
def a2a_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A server per test module: orchestrators here own their durable consumers."""
    server = EmbeddedNats(data_dir=Path(tmp_path_factory.mktemp("a2a-nats")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def a2a_bus(a2a_server: EmbeddedNats) -> AsyncIterator[Bus]:
    nc = await connect(a2a_server.url)
    js = jetstream(nc)
    await declare_streams(js)
    yield Bus(a2a_server, nc, js, Ledger(nc, js))
    await nc.close()
