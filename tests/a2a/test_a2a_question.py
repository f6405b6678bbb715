"""An agent asks its user a question (the built-in `ask_user` tool): the task is
input-required with the question in its status, a follow-up message over A2A is the
answer (any text, even "yes"; no approver token: it authorizes nothing else), and the step
goes on with it. The answer is on the ledger, bound to that call."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from a2a.types import TaskState
from a2a_mesh import Mesh
from a2a_support import Bus, until
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel
from test_a2a_followup import BINDINGS, client_for, message, send, settings

from jetmesh.agents.models.sim import FunctionModel, tool_call
from jetmesh.agents.models.types import ModelRequest, ToolCall
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.agents.tools import ask_user
from jetmesh.bus import events as ev


class Wish(BaseModel):
    wish: str


ASKER = AgentSpec(
    name="asker", description="Asks which colour, then says it.", instructions="Ask.",
    tools=[ask_user],
    skills=[SkillSpec.from_models("paint", "Paint", "Paints in a colour.", input_model=Wish)])


def ask_then_say(request: ModelRequest) -> list[ToolCall] | str:
    told = [m for m in request.messages if m.role == "tool"]
    if not told:
        return [tool_call("ask_user", question="Which colour would you like?")]
    return "painting it: " + told[-1].content[-400:]


@pytest.fixture(scope="module")
async def mesh(a2a_bus: Bus) -> AsyncIterator[Mesh]:
    m = Mesh(a2a_bus.url, [ASKER], models={"asker": FunctionModel(ask_then_say)},
             gateway_settings=settings())
    await m.start()
    reg = m.gateway.registry
    assert reg is not None
    await until(lambda: "paint" in set(reg.skills()), 10, "the asker in the registry")
    yield m
    await m.stop()


def status_text(task: Any) -> str:
    return " ".join(p.get("text", "") for p in MessageToDict(task.status.message)["parts"])


@pytest.mark.parametrize(("binding", "answer"), [(BINDINGS[0], "blue, please"),
                                                 (BINDINGS[1], "yes")])
async def test_a_question_is_answered_by_a_follow_up_and_the_step_goes_on(
        mesh: Mesh, binding: str, answer: str) -> None:
    async with client_for(mesh, binding) as client:  # no approver token
        task = await asyncio.wait_for(send(client, message(
            data={"wish": "paint the shed"}, skill="paint")), 20)
        assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        assert "Which colour would you like?" in status_text(task)
        waiting = MessageToDict(task.status.message)["parts"][1]["data"]["pendingApprovals"]
        assert [w["tool"] for w in waiting] == ["ask_user"]
        with pytest.raises(Exception, match="answer in a text part"):
            await send(client, message(data={"nothing": 1}, task_id=task.id))
        done = await asyncio.wait_for(send(client, message(answer, task_id=task.id)), 20)
        assert done.status.state == TaskState.TASK_STATE_COMPLETED, status_text(done)
        assert answer in json.dumps(MessageToDict(done))
    entries = await mesh.gateway.client.events(task.id)  # type: ignore[union-attr]
    granted = [e.event for e in entries if isinstance(e.event, ev.ApprovalGranted)]
    assert len(granted) == 1 and granted[0].data.reason == answer
    assert granted[0].data.by == "a2a:user" and granted[0].data.tool == "ask_user"
    calls = [e.event.data for e in entries if isinstance(e.event, ev.ToolCalled)]
    assert [(c.tool, c.output) for c in calls] == [("ask_user", {"answer": answer})]
