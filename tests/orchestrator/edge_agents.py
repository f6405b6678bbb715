"""A cheap deterministic agent (no model) for the orchestrator's edge tests."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.agents.tools import tool
from jetmesh.bus.events import PlanStep
from jetmesh.orchestrator.workflows import Workflow


class EchoInput(BaseModel):
    text: str


class EchoOutput(BaseModel):
    echoed: str


@tool(description="Echo the text.")
def edge_echo(args: EchoInput) -> EchoOutput:
    return EchoOutput(echoed=args.text)


ECHO = AgentSpec(
    name="edgeecho", description="Echoes.",
    skills=[SkillSpec.from_models("edge_echo", "Echo", "Echo the text.",
                                  input_model=EchoInput, output_model=EchoOutput)],
    tools=[edge_echo], direct={"edge_echo": "edge_echo"},
)

ECHO_FLOW = Workflow(name="edge-echo", steps=[
    PlanStep(id="echo", skill="edge_echo", input={"text": {"$ref": "task.goal"}})])


def unserved_flow(skill: str) -> Workflow:
    """One step of a skill nobody serves: the task stays open, its step queued."""
    return Workflow(name=skill, steps=[PlanStep(id="only", skill=skill, input={})])


async def stale_view(orch: Any, skill: str = "edge_echo") -> None:
    """Freeze the orchestrator's registry view, as a saturated loop does (its KV watch is
    not read): the agent's entries age past their TTL and it looks gone, alive as it is."""
    view = orch.directory.view  # the real directory's presence view
    await view.stop()
    view.ttl_s = 1.0
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while skill in (orch.live_skills() or {}):
        assert loop.time() < end, "the view never went stale"
        await asyncio.sleep(0.05)
