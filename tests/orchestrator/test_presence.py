"""The orchestrator's view of live skills follows agents coming and going."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus.connection import connect, jetstream
from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings


class Question(BaseModel):
    question: str


async def test_a_skill_that_appeared_is_seen_at_once_after_the_ticker_took_the_change(
        bus) -> None:
    """The ticker clears the 'an agent came or went' flag; the skills cached before the
    change must go with it, or a task arriving in the next moments waits (up to
    no_agent_wait_s) for an agent that is already there."""
    skill = "presence" + ev.new_id()[:8]
    nc = await connect(bus.url)
    orch = Orchestrator(nc, jetstream(nc), model=SimModel(),
                        settings=OrchestratorSettings(tick_s=3600))
    await orch.start()
    wnc = await connect(bus.url)
    worker = None
    try:
        skills = orch.live_skills()
        assert skills is not None and skill not in skills  # cached before the agent exists
        frozen = orch.skills.skills_at
        orch.skills.clock = lambda: frozen  # the cache never ages by time in this test
        spec = AgentSpec(name=skill, description="Echo.", instructions="Echo.",
                         skills=[SkillSpec.from_models(skill, "Echo", "Echoes.",
                                                       input_model=Question)])
        worker = Worker(spec, SimModel(), wnc, jetstream(wnc), replica=f"{skill}-1")
        await worker.start()
        assert orch.directory is not None
        for _ in range(200):  # the orchestrator's presence view has seen the agent
            if skill in orch.directory.skills():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the agent never showed up in the presence view")
        await orch._tick()  # the ticker takes the change
        live = orch.live_skills()
        assert live is not None and skill in live
    finally:
        if worker is not None:
            await worker.stop()
        await wnc.close()
        await orch.stop()
        await nc.close()
