"""recall / remember tools over the service, the researcher's memory wiring, mem0's LLM
through the model layer."""

from __future__ import annotations

import asyncio
import json

from memory_helpers import Served

from jetmesh.agents.builtin.researcher import make_researcher
from jetmesh.agents.models.sim import FunctionModel
from jetmesh.agents.models.types import ModelRequest
from jetmesh.agents.tools import ToolContext
from jetmesh.memory import EpisodeRecord
from jetmesh.memory.llm import JetmeshLLM, JetmeshLLMConfig, to_model_request
from jetmesh.memory.tools import make_memory_tools, with_memory_tools


def ctx(user: str | None = "alice", task: str = "t9", step: str = "s1",
        key: str = "") -> ToolContext:
    return ToolContext(task_id=task, step_id=step, agent="researcher", user_id=user,
                       idempotency_key=key)


async def test_recall_is_scoped_by_the_tool_context(served: Served) -> None:
    c = served.client
    await c.add_episode(EpisodeRecord(task_id="t1", step_id="s1", request="refund time?",
                                      outcome="refunds take 7 days", user_id="alice",
                                      agent_id="researcher"))
    await c.add_episode(EpisodeRecord(task_id="t2", step_id="s1", request="refund time?",
                                      outcome="refunds take 9 days", user_id="bob",
                                      agent_id="writer"))
    recall, remember = make_memory_tools(c)
    assert (recall.name, remember.name) == ("recall", "remember")
    assert remember.side_effects and not recall.side_effects and recall.untrusted_output

    mine = await recall.invoke({"query": "refund time"}, ctx())
    assert mine.ok and mine.output is not None
    assert mine.output["scope"] == "user"
    assert [h["task_id"] for h in mine.output["hits"]] == ["t1"]
    # no user on the task: recall falls back to the agent's own memories
    anon = await recall.invoke({"query": "refund time"}, ctx(user=None))
    assert anon.output is not None and anon.output["scope"] == "agent"
    assert [h["task_id"] for h in anon.output["hits"]] == ["t1"]
    assert (await recall.invoke({"query": "refund", "scope": "task"}, ctx())).output == {
        "scope": "task", "hits": []}
    bad = await recall.invoke({"query": ""}, ctx())
    assert not bad.ok and bad.kind == "invalid_arguments"
    assert "untrusted-data" in recall.content_for_model(mine)


async def test_remember_stores_once_per_call_with_the_step_as_provenance(
    served: Served,
) -> None:
    _, remember = make_memory_tools(served.client)
    first = await remember.invoke({"text": "Alice wants email, not calls."}, ctx(key="k-1"))
    again = await remember.invoke({"text": "Alice wants email, not calls."}, ctx(key="k-1"))
    assert first.ok and again.ok and first.output == again.output
    assert first.output is not None
    item = await served.client.get(first.output["id"])
    assert (item.kind, item.user_id, item.agent_id, item.task_id) == (
        "fact", "alice", "researcher", "t9")
    assert item.derived_from == ["t9:s1"]
    assert (await served.client.forget("t9")).facts_deleted == [item.id]


async def test_tools_fail_as_tool_errors_when_the_service_is_gone(bus) -> None:
    from jetmesh.memory.client import MemoryClient

    recall, _ = make_memory_tools(MemoryClient(bus.nc, timeout_s=0.5))
    result = await recall.invoke({"query": "x"}, ctx())
    assert not result.ok and result.kind == "exception"
    assert "memory service unavailable" in (result.error or "")


def test_the_researcher_is_offered_recall_first() -> None:
    from jetmesh.memory.client import MemoryClient

    tools = make_memory_tools(MemoryClient(None, timeout_s=1))  # type: ignore[arg-type]
    direct = make_researcher(extra_tools=tools)
    assert [t.name for t in direct.tools] == ["recall", "search_kb", "remember"]
    attached = with_memory_tools(make_researcher(), tools)
    assert [t.name for t in attached.tools] == ["recall", "search_kb", "remember"]
    assert attached.instructions == make_researcher().instructions  # already says recall
    assert with_memory_tools(attached, tools) is attached
    assert [t.name for t in make_researcher().tools] == ["search_kb"]


def test_mem0_messages_become_a_model_request() -> None:
    request = to_model_request(
        [{"role": "system", "content": "extract"}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "ok"}], json_object=True, max_tokens=99)
    assert request.system == "extract"
    assert [(m.role, m.content) for m in request.messages] == [("user", "hi"),
                                                                ("assistant", "ok")]
    assert request.output_schema == {"type": "object"} and request.max_tokens == 99


async def test_jetmesh_llm_calls_the_model_on_its_loop_from_a_thread() -> None:
    def answer(request: ModelRequest) -> str:
        return json.dumps({"memory": [{"text": request.messages[0].content.upper()}]})

    model = FunctionModel(answer)
    llm = JetmeshLLM(JetmeshLLMConfig(jetmesh_model=model, loop=asyncio.get_running_loop()))
    text = await asyncio.to_thread(
        llm.generate_response, [{"role": "user", "content": "tea"}],
        response_format={"type": "json_object"})
    assert json.loads(text) == {"memory": [{"text": "TEA"}]}
    assert model.requests[0].output_schema == {"type": "object"}
