"""Multi-turn contexts: a new task in a context is planned with its earlier turns.

Through the official SDK client (same `contextId`) and from a plain NATS submitter
(metadata `a2a.context_id`): the planner sees the earlier tasks' messages and answers,
and the task's TaskPlanned records them (each naming its task and the ledger sequence
read). Bounded; tenants do not share contexts."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.types import Message, Part, Role, SendMessageConfiguration, SendMessageRequest, Task
from a2a.types import TaskState as A2AState
from a2a.utils.constants import TransportProtocol
from a2a_mesh import Mesh
from a2a_support import Bus
from pydantic import BaseModel

from jetmesh.agents.builtin import get_agent
from jetmesh.agents.models.sim import FunctionModel
from jetmesh.agents.models.types import ModelRequest
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.bus import events as ev
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.context import ContextLimits, Contexts, bounded
from jetmesh.orchestrator.state import fold

PLANS: list[dict[str, Any]] = []
"""Every planning request's user message (goal, input, earlier_turns), in order."""
SYSTEMS: list[str] = []
"""The instructions of every model call of the concierge agent."""


class Ask(BaseModel):
    question: str


CONCIERGE = AgentSpec(
    name="concierge", description="Answers follow-up questions.", instructions="Answer.",
    skills=[SkillSpec.from_models("reply", "Reply", "Answers a question.", input_model=Ask)])


def concierge(request: ModelRequest) -> str:
    SYSTEMS.append(request.system or "")
    return "It shipped with the carrier named in the earlier answer."


def planner(request: ModelRequest) -> str:
    """Plans one order lookup: the order id from the input, else from the latest
    earlier turn that named one (what a real planner reads the turns for)."""
    body = json.loads(request.messages[0].content)
    if "skills" not in body:  # a merge
        return "merged"
    PLANS.append(body)
    if body["goal"].startswith("Reply:"):
        return json.dumps({"steps": [{"id": "look", "skill": "reply",
                                      "input": {"question": body["goal"]}}], "merge": False})
    order = body["input"].get("order_id") or next(
        (t["input"]["order_id"] for t in reversed(body.get("earlier_turns", []))
         if "order_id" in (t.get("input") or {})), "NONE")
    return json.dumps({"steps": [{"id": "look", "skill": "lookup_order",
                                  "input": {"order_id": order}}], "merge": False})


@pytest.fixture(scope="module")
async def mesh(a2a_bus: Bus) -> AsyncIterator[Mesh]:
    m = Mesh(a2a_bus.url, [get_agent("orders"), CONCIERGE], planner=FunctionModel(planner),
             models={"concierge": FunctionModel(concierge)})
    await m.start()
    yield m
    await m.stop()


async def _send(mesh: Mesh, text: str, context_id: str, data: dict[str, Any] | None = None
                ) -> Task:
    parts = [Part(text=text)]
    if data:
        p = Part()
        p.data.struct_value.update(data)
        parts.append(p)
    msg = Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER, parts=parts,
                  context_id=context_id)
    async with httpx.AsyncClient(timeout=60) as http:
        client = await create_client(mesh.base, client_config=ClientConfig(
            streaming=False, supported_protocol_bindings=[TransportProtocol.JSONRPC],
            httpx_client=http))
        async with client:
            out = [r async for r in client.send_message(SendMessageRequest(
                message=msg, configuration=SendMessageConfiguration()))]
    assert len(out) == 1 and out[0].HasField("task"), out
    return out[0].task


async def _planned(client: Client, task_id: str) -> ev.TaskPlannedData:
    (planned,) = [e.event.data for e in await client.events(task_id)
                  if isinstance(e.event, ev.TaskPlanned)]
    return planned


async def test_a_task_is_planned_with_the_earlier_turns_of_its_context(mesh: Mesh) -> None:
    ctx = f"ctx-{uuid.uuid4().hex[:12]}"
    first = await _send(mesh, "Where is my order?", ctx, {"order_id": "A1029"})
    assert first.status.state == A2AState.TASK_STATE_COMPLETED
    second = await _send(mesh, "And which carrier has it?", ctx)
    assert second.status.state == A2AState.TASK_STATE_COMPLETED
    assert second.context_id == ctx
    async with Client(mesh.url) as client:
        one = fold(first.id, await client.events(first.id))
        p1, p2 = await _planned(client, first.id), await _planned(client, second.id)
        # The first turn had none; the second was planned with the first, from its ledger.
        assert p1.context is not None and p1.context.turns == []
        assert p2.context is not None and p2.context.context_id == ctx
        (turn,) = p2.context.turns
        assert (turn.task_id, turn.status, turn.goal, turn.input, turn.seq) == (
            first.id, "completed", "Where is my order?", {"order_id": "A1029"}, one.last_seq)
        assert turn.answer is not None and "A1029" in turn.answer
        # The planner read the order id from the earlier turn.
        (step,) = p2.steps
        assert step.input == {"order_id": "A1029"}
        asked = [b for b in PLANS if b["goal"] == "And which carrier has it?"]
        assert asked and asked[-1]["earlier_turns"][0]["answer"] == turn.answer
        assert "earlier_turns" not in [b for b in PLANS if b["goal"] ==
                                       "Where is my order?"][-1]

        # A NATS submitter joins the same context by its metadata entry; the agent that
        # runs its step gets the turns too (in its model's instructions).
        third = await client.submit("Reply: has it shipped?",
                                    metadata={"a2a.context_id": ctx})
        assert (await client.result(third, timeout=30)).status.value == "completed"
        p3 = await _planned(client, third)
        assert p3.context is not None
        assert [t.task_id for t in p3.context.turns] == [first.id, second.id]
        assert SYSTEMS and "Earlier turns of this conversation" in SYSTEMS[-1]
        assert "Where is my order?" in SYSTEMS[-1] and first.id in SYSTEMS[-1]
        assert json.dumps(turn.answer, ensure_ascii=False)[1:-1][:40] in SYSTEMS[-1]
        # Another tenant's task with the same context id sees none of them.
        other = await client.submit("Has it shipped?", tenant="acme",
                                    metadata={"a2a.context_id": ctx})
        assert (await client.result(other, timeout=30)).terminal
        p4 = await _planned(client, other)
        assert p4.context is not None and p4.context.turns == []


async def test_the_turns_are_bounded_and_the_oldest_go_first(a2a_bus: Bus) -> None:
    turns = [ev.ContextTurn(task_id=f"t{i}", status="completed", goal="g" * 300,
                            answer="a" * 300, seq=i) for i in range(8)]
    ctx = bounded("c", turns, 8, ContextLimits(max_turns=5, max_chars=2200))
    assert [t.task_id for t in ctx.turns] == ["t5", "t6", "t7"]  # 5 by count, 3 by size
    assert ctx.omitted == 5 and len(ctx.model_dump_json()) <= 2200
    # Joining is idempotent (a task planned again after a restart keeps its place) and
    # keeps the latest ids only.
    contexts = Contexts(a2a_bus.js, a2a_bus.ledger, ContextLimits(keep_tasks=3))
    cid = uuid.uuid4().hex
    assert await contexts.join(cid, None, "a") == []
    assert await contexts.join(cid, None, "b") == ["a"]
    assert await contexts.join(cid, None, "a") == []
    assert await contexts.join(cid, None, "c") == ["a", "b"]
    assert await contexts.join(cid, None, "d") == ["a", "b", "c"]
    assert await contexts.join(cid, None, "e") == ["b", "c", "d"]
    assert await contexts.join(cid, "acme", "x") == []  # tenants apart
    assert await contexts.join("not a token / at all", None, "y") == []


async def test_contexts_on_the_in_memory_ports() -> None:
    """The orchestrator with no NATS (jetmesh.orchestrator.testing) keeps contexts too."""
    from jetmesh.orchestrator.testing import memory_mesh

    mm = memory_mesh([get_agent("orders")], planner=FunctionModel(planner))

    async def turn(tid: str, goal: str, data: dict[str, Any]) -> ev.TaskPlannedData:
        await mm.ledger.append(ev.TaskSubmitted(
            id=f"{tid}-submitted", subject=tid, data=ev.TaskSubmittedData(
                goal=goal, input=data, metadata={"a2a.context_id": "mem-ctx"})),
            expected_last_subject_seq=0)
        await mm.orchestrator.drive(tid)
        done = await mm.complete(tid, "look", {"order_id": "A1029", "found": True})
        assert done.terminal
        (planned,) = [e.event.data for e in await mm.ledger.read(tid)
                      if isinstance(e.event, ev.TaskPlanned)]
        return planned

    await turn("m1", "Where is my order?", {"order_id": "A1029"})
    second = await turn("m2", "Which carrier?", {})
    assert second.context is not None
    assert [t.task_id for t in second.context.turns] == ["m1"]
    assert second.steps[0].input == {"order_id": "A1029"}
    # The step command carries the turns to the agent; a task with none carries none.
    (cmd,) = mm.commands("m2")
    assert cmd.context == second.context
    (first_cmd,) = mm.commands("m1")
    assert first_cmd.context is None
