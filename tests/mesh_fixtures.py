"""An in-process mesh (orchestrator + workers) on the session's nats-server: the
harness users get (jetmesh.orchestrator.testing), on the session's server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from jetmesh.agents.models.types import Model
from jetmesh.agents.spec import AgentSpec
from jetmesh.orchestrator.registry import live_agents
from jetmesh.orchestrator.service import OrchestratorSettings
from jetmesh.orchestrator.testing import Mesh, start_mesh

sys.path.insert(0, str(Path(__file__).parent / "e2e"))


async def wait_live(js, names: set[str]) -> None:
    for _ in range(100):
        if names <= {a.name for a in await live_agents(js, ttl_s=5)}:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"agents {names} never became live")


MakeMesh = Callable[..., Awaitable[Mesh]]


@pytest.fixture
async def make_mesh(bus) -> AsyncIterator[MakeMesh]:
    started: list[Mesh] = []

    async def make(agents: list[str | AgentSpec], *, planner: Model | None = None,
                   worker_model: Model | None = None, no_agent_wait_s: float = 30.0) -> Mesh:
        mesh = await start_mesh(agents, url=bus.url, planner=planner, worker_model=worker_model,
                                settings=OrchestratorSettings(no_agent_wait_s=no_agent_wait_s,
                                                              tick_s=0.1))
        started.append(mesh)
        return mesh

    yield make
    for mesh in started:
        await mesh.stop()
