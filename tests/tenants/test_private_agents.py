"""An agent private to a tenant: its registry entry says so; the orchestrator sends that
tenant's steps to the tenant's private work subject while such an agent is live, and
every other tenant's to the skill's shared subject, so another tenant's task never
reaches the private agent (and a shared agent serves it); the private worker still
refuses a step of another tenant (the tenant is the submission's, not the command's)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from helpers import record_dispatch, wait_for_entry

from jetmesh.agents.models.sim import FunctionModel, SimModel
from jetmesh.agents.models.types import ModelRequest
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.events import PlanStep
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings
from jetmesh.orchestrator.state import TaskStatus
from jetmesh.orchestrator.workflows import Workflow, WorkflowRegistry

SKILL = "priv_echo"
SHARED = AgentSpec(name="echo-shared", description="Echoes.", instructions="Echo.",
                   skills=[SkillSpec(id=SKILL, name="Echo", description="Echoes.")])
PRIVATE = dataclasses.replace(SHARED, name="echo-t-a", tenants=["t-a"])
ECHO = Workflow(name="priv-echo", steps=[PlanStep(id="only", skill=SKILL,
                                                  input={"question": {"$ref": "task.goal"}})])


def echo(request: ModelRequest) -> str:
    return "echo: " + " ".join(m.content for m in request.messages if m.role == "user")[:80]


async def test_a_tenants_steps_go_to_its_private_agent_and_no_one_elses(bus) -> None:
    workers = [Worker(spec, FunctionModel(echo), bus.nc, bus.js, replica=f"{spec.name}-1")
               for spec in (SHARED, PRIVATE)]
    orch = Orchestrator(bus.nc, bus.js, model=SimModel(),
                        settings=OrchestratorSettings(tick_s=0.1),
                        workflows=WorkflowRegistry([ECHO]))
    client = Client(bus.url)
    await client.connect()
    for w in workers:
        await w.start()
    await orch.start()
    try:
        kv = await bus.js.key_value(subjects.BUCKET_AGENTS)
        entry = json.loads((await kv.get("echo-t-a.echo-t-a-1")).value or b"{}")
        assert entry["tenants"] == ["t-a"]
        directory = orch.skills.directory
        assert directory is not None

        async def both_live() -> None:
            while {a.name for a in directory.agents(skill=SKILL)} != {SHARED.name,
                                                                       PRIVATE.name}:
                directory.changed.clear()
                await directory.changed.wait()
        await asyncio.wait_for(both_live(), 30)
        tasks = {tenant: [await client.submit(f"hello {tenant} {i}", workflow=ECHO.name,
                                              tenant=tenant) for i in range(3)]
                 for tenant in ("t-a", "t-b", None)}
        served: dict[str | None, set[str]] = {}
        for tenant, ids in tasks.items():
            for task_id in ids:
                state = await client.result(task_id, timeout=60)
                assert state.status is TaskStatus.COMPLETED, (tenant, state)
                done = [e.event for e in await bus.ledger.read(task_id)
                        if isinstance(e.event, ev.StepCompleted)]
                served.setdefault(tenant, set()).update(d.data.agent for d in done)
        assert served == {"t-a": {PRIVATE.name}, "t-b": {SHARED.name}, None: {SHARED.name}}
        # A command forged onto the private subject for another tenant: the private
        # worker takes the tenant from the submission in the ledger and refuses it.
        cmd = ev.StepCommand(task_id=ev.new_id(), step_id="s1", skill=SKILL,
                             input={"question": "mine?"}, tenant="t-a")
        await record_dispatch(bus.ledger, cmd, tenant="t-b")
        await bus.js.publish(subjects.private_work(SKILL, "t-a"),
                             cmd.model_dump_json().encode())
        done = await wait_for_entry(bus.ledger, cmd.task_id, lambda e: isinstance(
            e.event, ev.StepCompleted | ev.StepFailed))
        assert isinstance(done.event, ev.StepFailed), done.event
        assert done.event.data.code == "forbidden" and done.event.data.agent == PRIVATE.name
    finally:
        await orch.stop()
        for w in workers:
            await w.stop()
        await client.close()
