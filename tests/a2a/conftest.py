"""Fixtures for the A2A tests: a NATS server of their own and a polling helper."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.ledger import Ledger
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.streams import declare_streams


@dataclass
class Bus:
    server: EmbeddedNats
    nc: NATS
    js: JetStreamContext
    ledger: Ledger

    @property
    def url(self) -> str:
        return self.server.url


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


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
                ) -> float:
    """Poll an observable condition; returns the seconds it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start
