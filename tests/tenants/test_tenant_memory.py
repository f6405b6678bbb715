"""Memory is per tenant: the same user and agent in two tenants share no memories (the
readers enforce it: ids are scoped `<tenant>/<id>` by the memory tools and episodes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for_entry
from tenant_helpers import send_tenant_step

from jetmesh.agents.models.sim import FunctionModel, tool_call
from jetmesh.agents.models.types import ModelRequest
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus.connection import connect
from jetmesh.memory import MemorySettings, MemoryStore
from jetmesh.memory.client import MemoryClient
from jetmesh.memory.models import tenant_scoped
from jetmesh.memory.service import MemoryService
from jetmesh.memory.tools import make_memory_tools


def remember_or_recall(request: ModelRequest) -> Any:
    first = next(m.content for m in request.messages if m.role == "user")
    told = [m for m in request.messages if m.role == "tool"]
    if not told:
        if "remember" in first:
            return tool_call("remember", text="Ann prefers refunds to store credit.")
        scope = "agent" if "agent" in first else "user"
        return tool_call("recall", query="Ann refunds store credit", scope=scope)
    return told[-1].content


@pytest.fixture
async def memory(bus, tmp_path: Path):  # type: ignore[no-untyped-def]
    store = await MemoryStore.open(MemorySettings(data_dir=tmp_path / "mem",
                                                  embedder="hash", hash_dims=256))
    service = MemoryService(bus.nc, bus.js, store, episodes=False)
    await service.start()
    nc = await connect(bus.url)
    yield MemoryClient(nc)
    await nc.close()
    await service.stop()
    await store.close()


def test_ids_are_scoped_by_tenant() -> None:
    assert tenant_scoped("ann", None) == "ann"
    assert tenant_scoped("ann", "t-a") == "t-a/ann" != tenant_scoped("ann", "t-b")
    assert tenant_scoped(None, "t-a") is None


async def test_tenant_b_recalls_nothing_of_tenant_a(bus, memory) -> None:
    spec = AgentSpec(name="mem-tenant", description="remembers and recalls",
                     tools=make_memory_tools(memory),
                     skills=[SkillSpec(id="mem_tenant", name="m", description="m")])
    worker = Worker(spec, FunctionModel(remember_or_recall), bus.nc, bus.js,
                    replica="mem-t")
    await worker.start()

    async def run(tenant: str, ask: str) -> dict[str, Any]:
        cmd = ev.StepCommand(task_id=ev.new_id(), step_id="s1", skill="mem_tenant",
                             input={"ask": ask}, user_id="ann", tenant=tenant)
        await send_tenant_step(bus.ledger, cmd)
        done = await wait_for_entry(bus.ledger, cmd.task_id, lambda e: isinstance(
            e.event, ev.StepCompleted | ev.StepFailed))
        assert isinstance(done.event, ev.StepCompleted), done.event
        (call,) = [e.event.data for e in await bus.ledger.read(cmd.task_id)
                   if isinstance(e.event, ev.ToolCalled)]
        assert call.error is None, call.error
        out: dict[str, Any] = call.output
        return out

    try:
        stored = await run("t-a", "remember this")
        for scope in ("user", "agent"):
            mine = await run("t-a", f"recall ({scope})")
            assert [h["id"] for h in mine["hits"]] == [stored["id"]], (scope, mine)
            theirs = await run("t-b", f"recall ({scope})")
            assert theirs["hits"] == [], (scope, json.dumps(theirs))
    finally:
        await worker.stop()
