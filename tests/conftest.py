"""Shared fixtures: one real nats-server (JetStream) per test session."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

os.environ.setdefault("JETMESH_ALLOW_MODEL_REQUESTS", "0")
os.environ.setdefault("MEM0_TELEMETRY", "False")

# `python -m pytest` from the checkout puts the checkout itself on sys.path, where its
# `a2a/` and `agents/` folders (installed as jetmesh.a2a, jetmesh.agents) would shadow the
# A2A SDK and the OpenAI Agents SDK. jetmesh is imported by its installed name, so the
# checkout's own folder is not needed on the path.
_CHECKOUT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]
for _shadowed in ("a2a", "agents"):
    _mod = sys.modules.get(_shadowed)
    if _mod is not None and str(getattr(_mod, "__file__", "") or "").startswith(str(_CHECKOUT)):
        del sys.modules[_shadowed]  # imported from the checkout before this ran

from jetmesh.bus.connection import connect, jetstream  # noqa: E402
from jetmesh.bus.ledger import Ledger  # noqa: E402
from jetmesh.bus.server import EmbeddedNats  # noqa: E402
from jetmesh.bus.streams import declare_streams  # noqa: E402


def _timeout_of(item: pytest.Item) -> float:
    """The pytest-timeout limit that applies to `item` (marker, then option, then ini)."""
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    value = item.config.getoption("timeout", None) or item.config.getini("timeout")
    return float(value or 0)


def _await_chain(task: asyncio.Task[Any]) -> list[str]:
    """Where `task` waits: its coroutine and every coroutine or generator it awaits in
    turn (Task.print_stack shows only the outermost frame of a suspended task)."""
    lines: list[str] = []
    obj: Any = task.get_coro()
    while obj is not None and len(lines) < 40:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None) \
            or getattr(obj, "gi_frame", None)
        if frame is None:
            lines.append(f"    awaiting {obj!r:.200}")
            break
        lines.append(f"    {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        obj = getattr(obj, "cr_await", None) or getattr(obj, "ag_await", None) \
            or getattr(obj, "gi_yieldfrom", None)
    return lines


def _dump_tasks(loop: asyncio.AbstractEventLoop, nodeid: str) -> None:
    """Print where every task of the loop waits: pytest-timeout shows only threads,
    and the main thread of a hung async test is always in the loop's select()."""
    tasks = asyncio.all_tasks(loop)
    print(f"\n===== {nodeid}: near its timeout; {len(tasks)} asyncio tasks =====")
    for task in tasks:
        print(f"  {task.get_name()}:", *_await_chain(task), sep="\n")
    sys.stdout.flush()


@pytest.fixture(autouse=True)
async def _dump_tasks_before_timeout(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Schedule that dump on the session's loop a few seconds before the test's timeout
    (async tests only: the loop does not run during a sync test)."""
    limit = _timeout_of(request.node)
    handle = None
    if limit > 10 and inspect.iscoroutinefunction(getattr(request.node, "obj", None)):
        loop = asyncio.get_running_loop()
        handle = loop.call_later(limit - 5, _dump_tasks, loop, request.node.nodeid)
    yield
    if handle is not None:
        handle.cancel()


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
