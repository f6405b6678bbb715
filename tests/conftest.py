"""Shared fixtures: one real nats-server (JetStream) per test session."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

os.environ.setdefault("JETMESH_ALLOW_MODEL_REQUESTS", "0")
os.environ.setdefault("MEM0_TELEMETRY", "False")

from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.ledger import Ledger
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.streams import declare_streams


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(data_dir=Path(tmp_path_factory.mktemp("nats")))
    server.start()
    yield server
    server.stop()


@dataclass
class BusFixture:
    server: EmbeddedNats
    nc: NATS
    js: JetStreamContext
    ledger: Ledger

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="session")
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[BusFixture]:
    nc = await connect(nats_server.url)
    js = jetstream(nc)
    await declare_streams(js)
    yield BusFixture(nats_server, nc, js, Ledger(nc, js))
    await nc.close()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A server of the test's own, for tests that kill or restart it."""
    server = EmbeddedNats(data_dir=tmp_path / "nats")
    server.start()
    yield server
    server.stop()
