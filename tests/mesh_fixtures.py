"""An in-process mesh (orchestrator + workers) on the session's nats-server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jetmesh.agents.builtin import get_agent
from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.models.types import Model
from jetmesh.agents.spec import AgentSpec
from jetmesh.agents.worker import Worker
from jetmesh.bus.connection import connect, jetstream
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.registry import live_agents
from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings

sys.path.insert(0, str(Path(__file__).parent / "e2e"))


@dataclass
class Mesh:
    url: str
    orchestrator: Orchestrator
    client: Client
    workers: list[Worker] = field(default_factory=list)

    async def stop(self) -> None:
        for w in self.workers:
            await w.stop()
            await w.nc.close()
        await self.orchestrator.stop()
        await self.orchestrator.nc.close()
        await self.client.close()


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
        nc = await connect(bus.url)
        orch = Orchestrator(nc, jetstream(nc), model=planner or SimModel(),
                            settings=OrchestratorSettings(no_agent_wait_s=no_agent_wait_s,
                                                          tick_s=0.1))
        await orch.start()
        client = Client(bus.url)
        await client.connect()
        mesh = Mesh(bus.url, orch, client)
        started.append(mesh)
        for agent in agents:
            spec = get_agent(agent) if isinstance(agent, str) else agent
            wnc = await connect(bus.url)
            w = Worker(spec, (worker_model or SimModel()) if spec.needs_model else None,
                       wnc, jetstream(wnc), replica=f"{spec.name}-test")
            await w.start()
            mesh.workers.append(w)
        await wait_live(bus.js, {(a if isinstance(a, str) else a.name) for a in agents})
        return mesh

    yield make
    for mesh in started:
        await mesh.stop()
